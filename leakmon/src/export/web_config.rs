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
            // The dearest cost configured: an unknown user is checked against a hash of
            // that cost, so the answer's delay does not tell who exists.
            let cost = file
                .basic_auth_users
                .values()
                .filter_map(|h| h.get(4..6)?.parse::<u32>().ok())
                .max()
                .unwrap_or(bcrypt::DEFAULT_COST);
            let decoy = bcrypt::hash(format!("{:x}", crate::unix_nanos()), cost)
                .map_err(|e| invalid(format!("basic_auth_users: {e}")))?;
            Some(Users {
                hashes: Arc::new(file.basic_auth_users),
                decoy: Arc::new(decoy),
                verified: Arc::new(Mutex::new(HashSet::new())),
                digest_key: std::collections::hash_map::RandomState::new(),
                verifying: Arc::new(tokio::sync::Semaphore::new(1)),
                waiting: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
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
    /// What an unknown user's password is checked against (see `load`).
    decoy: Arc<String>,
    /// Credentials already checked against their hash: bcrypt is slow on purpose, and
    /// Prometheus sends the same ones every scrape. Bounded.
    verified: Arc<Mutex<HashSet<u64>>>,
    /// The key of the digests in `verified`: random per process, so a password is
    /// never kept in memory, and a digest cannot be matched without it.
    digest_key: std::collections::hash_map::RandomState,
    /// One bcrypt verification at a time, on a blocking thread: a flood of wrong
    /// passwords queues here, and neither holds the lock nor stalls the async threads
    /// that answer everyone else.
    verifying: Arc<tokio::sync::Semaphore>,
    /// Checks waiting for that turn; past [`MAX_WAITING`] a new one is refused at once,
    /// so a flood of guesses holds no more memory than that.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

/// Credentials remembered as verified at most.
const MAX_VERIFIED: usize = 64;
/// bcrypt checks waiting at most (remembered credentials, Prometheus' own, never wait).
pub const MAX_WAITING: usize = 8;

/// What an `Authorization` header asks, once decoded.
enum Claim {
    /// Malformed, or an unknown user: no.
    Refused,
    /// Checked before: yes, without bcrypt.
    Known,
    /// A user, a password and the hash to verify it against; for an unknown user the
    /// decoy, whose answer is no whatever it says.
    Unverified { key: (String, String), hash: String, known: bool },
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
        let key = (user.to_owned(), password.to_owned());
        let Some(hash) = self.hashes.get(user) else {
            return Claim::Unverified { key, hash: self.decoy.to_string(), known: false };
        };
        // The lock is held for a set lookup only, never across bcrypt.
        if self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&self.digest(&key))
        {
            return Claim::Known;
        }
        Claim::Unverified { key, hash: hash.clone(), known: true }
    }

    /// A keyed digest of a user and password (SipHash, 64 bits, keyed at random): what
    /// is remembered instead of the password.
    fn digest(&self, key: &(String, String)) -> u64 {
        use std::hash::BuildHasher as _;
        self.digest_key.hash_one(key)
    }

    fn remember(&self, key: (String, String)) {
        let digest = self.digest(&key);
        let mut verified = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(digest);
    }

    /// Whether an `Authorization` header value names a user with the right password;
    /// bcrypt runs on this thread (tests, and callers off the async runtime).
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        match self.claim(authorization) {
            Claim::Refused => false,
            Claim::Known => true,
            Claim::Unverified { key, hash, known } => {
                let ok = bcrypt::verify(&key.1, &hash).unwrap_or(false) && known;
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
            Claim::Unverified { key, hash, known } => {
                use std::sync::atomic::Ordering;
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return false;
                }
                let permit = self.verifying.clone().acquire_owned().await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                let Ok(permit) = permit else { return false };
                let password = key.1.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    let _one_at_a_time = permit;
                    bcrypt::verify(password, &hash).unwrap_or(false)
                })
                .await
                .unwrap_or(false)
                    && known;
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

    /// The users of a web configuration with one user, alice, hashed at bcrypt's
    /// usual cost (10).
    fn alice_at_cost_10() -> Users {
        let dir = tempfile::tempdir().expect("dir");
        let hash = bcrypt::hash("s3cret", 10).expect("hash");
        WebConfig::load(&write(dir.path(), &format!("basic_auth_users:\n  alice: '{hash}'\n")))
            .expect("valid")
            .users
            .expect("users")
    }

    /// An unknown user costs a bcrypt check as a known one does: the delay of a no does
    /// not tell which users exist.
    #[test]
    fn an_unknown_user_takes_as_long_to_refuse_as_a_wrong_password() {
        let users = alice_at_cost_10();
        let header =
            |creds: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds));
        // The fastest of five each: another process taking the CPU slows one check, never
        // speeds one up (one check each failed once in a full run beside a compiler).
        let time = |creds: &str| {
            (0..5)
                .map(|_| {
                    let start = std::time::Instant::now();
                    assert!(!users.allows(Some(&header(creds))));
                    start.elapsed()
                })
                .min()
                .expect("five checks")
        };
        let (wrong, unknown) = (time("alice:wrong"), time("mallory:wrong"));
        assert!(
            unknown.as_secs_f64() >= 0.5 * wrong.as_secs_f64(),
            "unknown user refused in {unknown:?}, a wrong password in {wrong:?}"
        );
    }

    /// A flood of wrong passwords waits in a bounded queue: past it, refused at once.
    #[test]
    fn checks_waiting_for_bcrypt_are_bounded() {
        let users = alice_at_cost_10();
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:wrong"));
        let start = std::time::Instant::now();
        let one = {
            let users = users.clone();
            let header = header.clone();
            runtime.block_on(async move { users.allows_async(Some(&header)).await })
        };
        assert!(!one);
        let single = start.elapsed();
        let start = std::time::Instant::now();
        let answers: Vec<bool> = runtime.block_on(async {
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let (users, header) = (users.clone(), header.clone());
                    tokio::spawn(async move { users.allows_async(Some(&header)).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        assert!(answers.iter().all(|a| !a));
        let flood = start.elapsed();
        // At most MAX_WAITING + 1 checks run one after the other; 64 would take 64 times one.
        assert!(
            flood.as_secs_f64() < (MAX_WAITING as f64 + 8.0) * single.as_secs_f64(),
            "64 wrong passwords took {flood:?}, one {single:?}"
        );
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
