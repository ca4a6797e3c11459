//! The web configuration file of Prometheus exporters (the exporter-toolkit format,
//! `--web.config.file`): TLS and basic authentication for every endpoint.
//!
//! In: a YAML file with `tls_server_config` (`cert_file`, `key_file`) and
//! `basic_auth_users` (user: bcrypt hash), the same file `node_exporter` takes. Out: a
//! rustls server configuration and a user table. Anything else the toolkit knows
//! (client certificates, cipher choices, HTTP headers) is refused with its name rather
//! than silently ignored.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// Why the file cannot be used; each says the file and what is wrong in one line.
#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("read web config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("web config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// A checked web configuration.
#[derive(Clone)]
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub users: Option<Users>,
}

impl WebConfig {
    /// Reads and checks `path`: the YAML, the certificate and key, the hashes.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let invalid = |message: String| WebConfigError::Invalid { path: path.to_owned(), message };
        let text = std::fs::read_to_string(path)
            .map_err(|source| WebConfigError::Read { path: path.to_owned(), source })?;
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?
        };
        // Relative paths are relative to the file, as the toolkit has them.
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = file
            .tls_server_config
            .map(|t| tls_config(&base.join(t.cert_file), &base.join(t.key_file)).map_err(invalid))
            .transpose()?;
        let users = if file.basic_auth_users.is_empty() {
            None
        } else {
            for (user, hash) in &file.basic_auth_users {
                if !hash.starts_with("$2") {
                    return Err(invalid(format!(
                        "basic_auth_users.{user} must be a bcrypt hash (htpasswd -nBC 10 \"\" | tr -d ':')"
                    )));
                }
            }
            Some(Users {
                hashes: Arc::new(file.basic_auth_users),
                verified: Arc::new(Mutex::new(HashSet::new())),
                verifying: Arc::new(tokio::sync::Semaphore::new(1)),
            })
        };
        Ok(Self { tls, users })
    }
}

fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect)
        .map_err(|e| format!("cert_file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("cert_file {}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key_file {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("cert_file and key_file do not make a server identity: {e}"))?;
    Ok(Arc::new(config))
}

/// The users of basic authentication.
#[derive(Clone)]
pub struct Users {
    hashes: Arc<BTreeMap<String, String>>,
    /// Credentials already checked against their hash: bcrypt is slow on purpose, and
    /// Prometheus sends the same ones every scrape. Bounded.
    verified: Arc<Mutex<HashSet<(String, String)>>>,
    /// One bcrypt verification at a time, on a blocking thread: a flood of wrong
    /// passwords queues here, and neither holds the lock nor stalls the async threads
    /// that answer everyone else.
    verifying: Arc<tokio::sync::Semaphore>,
}

/// Credentials remembered as verified at most.
const MAX_VERIFIED: usize = 64;

/// What an `Authorization` header asks, once decoded.
enum Claim {
    /// Malformed, or an unknown user: no.
    Refused,
    /// Checked before: yes, without bcrypt.
    Known,
    /// A user, a password and the hash to verify it against.
    Unverified { key: (String, String), hash: String },
}

impl Users {
    fn claim(&self, authorization: Option<&str>) -> Claim {
        use base64::Engine as _;
        let Some(encoded) = authorization.and_then(|a| a.strip_prefix("Basic ")) else {
            return Claim::Refused;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return Claim::Refused;
        };
        let Ok(text) = String::from_utf8(decoded) else { return Claim::Refused };
        let Some((user, password)) = text.split_once(':') else { return Claim::Refused };
        let Some(hash) = self.hashes.get(user) else { return Claim::Refused };
        let key = (user.to_owned(), password.to_owned());
        // The lock is held for a set lookup only, never across bcrypt.
        if self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&key) {
            return Claim::Known;
        }
        Claim::Unverified { key, hash: hash.clone() }
    }

    fn remember(&self, key: (String, String)) {
        let mut verified = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(key);
    }

    /// Whether an `Authorization` header value names a user with the right password;
    /// bcrypt runs on this thread (tests, and callers off the async runtime).
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        match self.claim(authorization) {
            Claim::Refused => false,
            Claim::Known => true,
            Claim::Unverified { key, hash } => {
                let ok = bcrypt::verify(&key.1, &hash).unwrap_or(false);
                if ok {
                    self.remember(key);
                }
                ok
            }
        }
    }

    /// [`Users::allows`] for the web server: bcrypt on a blocking thread, one at a time.
    pub async fn allows_async(&self, authorization: Option<&str>) -> bool {
        match self.claim(authorization) {
            Claim::Refused => false,
            Claim::Known => true,
            Claim::Unverified { key, hash } => {
                let Ok(permit) = self.verifying.clone().acquire_owned().await else { return false };
                let password = key.1.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    let _one_at_a_time = permit;
                    bcrypt::verify(password, &hash).unwrap_or(false)
                })
                .await
                .unwrap_or(false);
                if ok {
                    self.remember(key);
                }
                ok
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("web.yml");
        std::fs::write(&path, text).expect("write");
        path
    }

    use base64::Engine as _;

    #[test]
    fn users_are_checked_against_their_bcrypt_hash() {
        let dir = tempfile::tempdir().expect("dir");
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let config = WebConfig::load(&write(dir.path(), &format!("basic_auth_users:\n  alice: '{hash}'\n")))
            .expect("valid");
        let users = config.users.expect("users");
        let header =
            |creds: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds));
        assert!(users.allows(Some(&header("alice:s3cret"))));
        assert!(users.allows(Some(&header("alice:s3cret"))), "again, from the cache");
        assert!(!users.allows(Some(&header("alice:wrong"))));
        assert!(!users.allows(Some(&header("bob:s3cret"))));
        assert!(!users.allows(None));
        assert!(!users.allows(Some("Bearer x")));
    }

    #[test]
    fn unsupported_keys_and_bad_values_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let err = |text: &str| WebConfig::load(&write(dir.path(), text)).err().expect("refused").to_string();
        assert!(err("http_server_config:\n  http2: false\n").contains("http_server_config"));
        assert!(err(
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n"
        )
        .contains("client_auth_type"));
        assert!(err("basic_auth_users:\n  alice: plain\n").contains("bcrypt"));
        assert!(err("tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n")
            .contains("missing.pem"));
        assert!(WebConfig::load(&write(dir.path(), "")).expect("empty is fine").tls.is_none());
    }
}
