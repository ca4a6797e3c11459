//! TLS and basic authentication from a Prometheus exporter web configuration file:
//! curl and a real Prometheus get in with the right credentials, nothing else does.

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::Reap;

const LISTEN: &str = "127.0.0.1:19491";
const PROMETHEUS: &str = "127.0.0.1:19492";

/// The HTTP status curl gets for `url` (0 when there is no HTTP answer at all).
fn status(url: &str, extra: &[&str]) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

fn certificate(dir: &Path) {
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success());
}

#[test]
fn tls_and_basic_auth_let_in_the_right_credentials_and_prometheus() {
    let dir = tempfile::tempdir().expect("temp dir");
    certificate(dir.path());
    let hash = bcrypt::hash("s3cret", 4).expect("hash");
    // Relative paths: relative to the file, as in the exporter toolkit.
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\nbasic_auth_users:\n  alice: '{hash}'\n"),
    )
    .expect("write web config");
    let _daemon = Reap(
        common::leakmon()
            .args(["run", "--attach", "none", "--web.listen-address", LISTEN, "--web.config.file"])
            .arg(&web)
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon"),
    );
    let url = format!("https://{LISTEN}/metrics");
    let ca = dir.path().join("cert.pem").display().to_string();
    let up = Instant::now();
    while status(&url, &["--cacert", &ca, "-u", "alice:s3cret"]) != 200 {
        assert!(up.elapsed() < Duration::from_secs(30), "the daemon did not serve over TLS");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&url, &["--cacert", &ca]), 401, "no credentials");
    assert_eq!(status(&url, &["--cacert", &ca, "-u", "alice:wrong"]), 401, "a wrong password");
    assert_eq!(status(&url, &["--cacert", &ca, "-u", "mallory:s3cret"]), 401, "an unknown user");
    assert_eq!(status(&format!("http://{LISTEN}/metrics"), &[]), 0, "plain HTTP gets no answer");

    // A real Prometheus scrapes it with the same settings a node_exporter would need.
    let tsdb = tempfile::tempdir().expect("tsdb");
    let config = tsdb.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: leakmon\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    basic_auth:\n      username: alice\n      password: s3cret\n    static_configs:\n      - targets: ['{LISTEN}']\n"
        ),
    )
    .expect("write prometheus config");
    let _prometheus = Reap(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tsdb.path().join("data").display()))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let query = "/api/v1/query?query=up%7Bjob%3D%22leakmon%22%7D";
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let answer = common::http_get(PROMETHEUS, query).unwrap_or_default();
        if answer.contains("\"value\":[") && answer.contains(",\"1\"]") {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped leakmon over TLS: {answer}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_bad_web_config_stops_the_daemon_with_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let web = dir.path().join("web.yml");
    std::fs::write(&web, "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  client_auth_type: RequireAndVerifyClientCert\n")
        .expect("write");
    let out = common::leakmon()
        .args(["run", "--attach", "none", "--web.listen-address", "127.0.0.1:19493", "--web.config.file"])
        .arg(&web)
        .output()
        .expect("run leakmon");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.contains("web config")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("client_auth_type") && line.contains("web.yml"), "{line}");
}

/// GET /metrics with basic authentication over plain HTTP: the status and how long the
/// answer took.
fn timed_get(user: &str, password: &str) -> (u16, Duration) {
    use base64::Engine as _;
    use std::io::{Read as _, Write as _};
    let started = Instant::now();
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let Ok(mut s) = std::net::TcpStream::connect(FLOOD) else { return (0, started.elapsed()) };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {FLOOD}\r\nAuthorization: Basic {token}\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, started.elapsed())
}

const FLOOD: &str = "127.0.0.1:19493";

/// Regression: bcrypt ran under a lock on the async threads, so a burst of wrong
/// passwords (each a deliberately slow verification) stalled every scrape behind it.
#[test]
fn a_flood_of_wrong_passwords_does_not_stall_a_good_scrape() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Cost 10, as htpasswd -B makes: tens of milliseconds a verification.
    let hash = bcrypt::hash("s3cret", 10).expect("hash");
    let web = dir.path().join("web.yml");
    std::fs::write(&web, format!("basic_auth_users:\n  alice: '{hash}'\n")).expect("write web config");
    let _daemon = Reap(
        common::leakmon()
            .args(["run", "--attach", "none", "--sample-interval", "1s", "--web.listen-address", FLOOD])
            .arg("--web.config.file")
            .arg(&web)
            .stderr(Stdio::null())
            .spawn()
            .expect("start leakmon"),
    );
    let up = Instant::now();
    while timed_get("alice", "s3cret").0 != 200 {
        assert!(up.elapsed() < Duration::from_secs(30), "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The good credentials are verified once; their usual answer time:
    let mut usual: Vec<Duration> = (0..10).map(|_| timed_get("alice", "s3cret").1).collect();
    usual.sort();
    let usual = usual[5];

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..16)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut refused = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, _) = timed_get("alice", &format!("wrong{i}"));
                    assert!(status == 401 || status == 0, "a wrong password got {status}");
                    refused += 1;
                }
                refused
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut during = Vec::new();
    for _ in 0..20 {
        let (status, took) = timed_get("alice", "s3cret");
        assert_eq!(status, 200);
        during.push(took);
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused: usize = flooders.into_iter().map(|f| f.join().expect("flooder")).sum();
    during.sort();
    let worst = *during.last().expect("answers");
    eprintln!("good scrape: usual {usual:?}, worst during {refused} wrong logins {worst:?}");
    assert!(refused >= 8, "the flood happened: {refused}");
    // Before the fix each good scrape queued behind the verifications under way: 16
    // flooders at tens of milliseconds each held it for most of a second or more.
    assert!(worst < Duration::from_millis(250).max(usual * 20), "worst {worst:?}, usual {usual:?}");
}
