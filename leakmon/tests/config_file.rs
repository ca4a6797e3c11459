//! The configuration file: checked with line numbers, and honoured by `run`.

mod common;

use std::{
    io::Read as _,
    io::Write as _,
    net::TcpStream,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use common::{leakmon, Reap};

#[test]
fn the_shipped_example_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/leakmon.toml");
    let out = leakmon().args(["config", "check"]).arg(&example).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("leakmon.toml: ok\n"));
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "window = \"1s\"\nmax-live = -5\nfrobnicate = true\n").expect("write");
    let out = leakmon().args(["config", "check"]).arg(&file).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].ends_with("bad.toml:2: max-live: must be between 1 and 4294967295, not -5"), "{err}");
    assert!(lines[1].contains("bad.toml:3: unknown key frobnicate"), "{err}");
    // `run` refuses it the same way, before doing anything.
    let out = leakmon().args(["run", "--config"]).arg(&file).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 2);
}

#[test]
fn run_takes_its_options_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("leakmon.toml");
    std::fs::write(
        &file,
        "sample-interval = \"200ms\"\nwindow = \"5s\"\n[web]\nlisten-address = \"127.0.0.1:19476\"\n",
    )
    .expect("write");
    let _daemon =
        Reap(leakmon().args(["run", "--config"]).arg(&file).stderr(Stdio::null()).spawn().expect("start"));
    let started = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect("127.0.0.1:19476") {
            write!(s, "GET /healthz HTTP/1.0\r\n\r\n").expect("write");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.contains(" 200 ") {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no daemon on the configured address");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every key of the file reaches the options `run` uses, through the same resolution
/// (command line over file) that `run --config` and its SIGHUP reload call.
#[test]
fn every_key_of_the_file_reaches_run() {
    use leakmon::{cli::Cli, values::Attach};
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("leakmon.toml");
    std::fs::write(
        &file,
        r#"sample-interval = "250ms"
window = "7m"
attach = "suspects"
suspect-duration = "3m"
max-suspects = 2
pid = [4242]
comm = ["redis-server"]
cgroup = ["/system.slice/app.service"]
top-stacks = 9
max-series = 321
interval = 17
top = 11
max-live = 1234
max-totals = 2345
max-stacks = 3456
unwind-rows = 4567
sample-bytes = "64KiB"
wrappers = ["my_alloc", "pool_*"]
suppress = ["arena_init"]

[web]
listen-address = "127.0.0.1:19999"
config-file = "web.yml"

[metrics]
pid-label = true
"#,
    )
    .expect("write");
    let matches = <Cli as clap::CommandFactory>::command()
        .try_get_matches_from(["leakmon", "run", "--window", "8m", "--config", file.to_str().expect("utf-8")])
        .expect("matches");
    let (_, run) = matches.subcommand().expect("run");
    let (_, args) = leakmon::config::resolve(run).expect("a valid file");
    let secs = Duration::from_secs;
    assert_eq!(args.sample_interval, Duration::from_millis(250));
    assert_eq!(args.window, secs(480), "the command line wins over the file");
    assert_eq!(args.attach, Some(Attach::Suspects));
    assert_eq!(args.suspect_duration, secs(180));
    assert_eq!(args.max_suspects, 2);
    assert_eq!(args.pids, [4242]);
    assert_eq!(args.comms, ["redis-server"]);
    assert_eq!(args.cgroups, ["/system.slice/app.service"]);
    assert_eq!(args.top_stacks, 9);
    assert_eq!(args.max_series, 321);
    assert_eq!(args.interval.get(), 17);
    assert_eq!(args.top, 11);
    assert_eq!(args.tables.max_live.get(), 1234);
    assert_eq!(args.tables.max_totals.get(), 2345);
    assert_eq!(args.tables.max_stacks.get(), 3456);
    assert_eq!(args.tables.unwind_rows, 4567);
    assert_eq!(args.tables.sample_bytes, 64 << 10);
    assert_eq!(args.tables.wrappers, ["my_alloc", "pool_*"]);
    assert_eq!(args.tables.suppress, ["arena_init"]);
    assert_eq!(args.listen, "127.0.0.1:19999".parse().expect("address"));
    assert_eq!(args.web_config, Some(dir.path().join("web.yml")), "relative to the file");
    assert!(args.pid_label);
}
