//! Bad input: one clear line on stderr and a non-zero exit, for each case.

mod common;

use std::process::Output;

use common::leakmon;

fn one_line_error(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "exit status; stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "exactly one line: {stderr:?}");
    assert!(stderr.starts_with("leakmon: "), "{stderr:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    stderr
}

#[test]
fn unknown_flag() {
    let out = leakmon().args(["report", "--bogus"]).output().expect("run");
    let err = one_line_error(&out, 2);
    assert!(err.contains("unexpected argument '--bogus'"), "{err}");
}

#[test]
fn report_without_pid_or_command() {
    let out = leakmon().arg("report").output().expect("run");
    let err = one_line_error(&out, 2);
    assert!(err.contains("--pid"), "{err}");
}

#[test]
fn pid_that_does_not_exist() {
    let out = leakmon().args(["report", "--pid", "2147483647", "--duration", "1"]).output().expect("run");
    assert_eq!(one_line_error(&out, 1), "leakmon: no process with pid 2147483647\n");
    let out = leakmon().args(["run", "--pid", "2147483647"]).output().expect("run");
    assert_eq!(one_line_error(&out, 1), "leakmon: no process with pid 2147483647\n");
}

#[test]
fn bad_duration() {
    let out = leakmon().args(["report", "--pid", "1", "--duration=0"]).output().expect("run");
    let err = one_line_error(&out, 1);
    assert!(err.contains("--duration must be a positive number of seconds"), "{err}");
}

/// Regressions: each of these panicked (a duration overflow), one after the probes
/// were loaded.
#[test]
fn huge_durations_are_one_line_not_a_panic() {
    let out = leakmon().args(["report", "--pid", "1", "--duration", "1e20"]).output().expect("run");
    assert_eq!(one_line_error(&out, 1), "leakmon: --duration 100000000000000000000 is longer than a year\n");
    let out = leakmon().args(["run", "--sample-interval", "99999999999999999999s"]).output().expect("run");
    let err = one_line_error(&out, 2);
    assert!(err.contains("\"99999999999999999999s\" is longer than a year"), "{err}");
    let out =
        leakmon().args(["run", "--window", "8760h", "--sample-interval", "8000h"]).output().expect("run");
    let err = one_line_error(&out, 1);
    assert!(err.contains("--window must hold at least 10 samples"), "{err}");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("leakmon.toml");
    std::fs::write(&file, "sample-interval = \"99999999999999999999s\"\nwindow = \"8760h\"\n")
        .expect("write");
    let out = leakmon().args(["config", "check"]).arg(&file).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("longer than a year"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn command_that_cannot_start() {
    let out = leakmon().args(["report", "--", "/nonexistent/leakmon-fixture"]).output().expect("run");
    let err = one_line_error(&out, 1);
    assert!(err.starts_with("leakmon: cannot start command /nonexistent/leakmon-fixture: "), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
}

#[test]
fn not_root() {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(env!("CARGO_BIN_EXE_leakmon"))
        .args(["report", "--", "true"])
        .output()
        .expect("run setpriv");
    let err = one_line_error(&out, 1);
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn kernel_without_btf() {
    let sysfs = tempfile::tempdir().expect("tempdir");
    let out =
        leakmon().env("LEAKMON_SYSFS", sysfs.path()).args(["report", "--", "true"]).output().expect("run");
    let err = one_line_error(&out, 1);
    assert!(err.contains("no BTF"), "{err}");
}

#[test]
fn kernel_without_uprobes() {
    let sysfs = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(sysfs.path().join("kernel/btf")).expect("mkdir");
    std::fs::write(sysfs.path().join("kernel/btf/vmlinux"), b"").expect("btf");
    let out =
        leakmon().env("LEAKMON_SYSFS", sysfs.path()).args(["report", "--", "true"]).output().expect("run");
    let err = one_line_error(&out, 1);
    assert!(err.contains("no uprobes"), "{err}");
}

#[test]
fn help_explains_both_report_modes() {
    let out = leakmon().args(["report", "--help"]).output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("leakmon report -- COMMAND"), "{help}");
    assert!(help.contains("--duration"), "{help}");
}

#[test]
fn duration_without_pid() {
    let out = leakmon().args(["report", "--duration", "1", "--", "true"]).output().expect("run");
    let err = one_line_error(&out, 1);
    assert!(err.contains("--duration goes with --pid"), "{err}");
}

#[test]
fn bad_holders_options() {
    let out =
        leakmon().args(["report", "--holders", "--holders-budget", "0", "--", "true"]).output().expect("run");
    let err = one_line_error(&out, 2);
    assert!(err.contains("\"0\" is not a number of milliseconds between 0 and an hour"), "{err}");
    let out = leakmon()
        .args(["report", "--holders", "--runtime", "--pid", "1", "--duration", "1"])
        .output()
        .expect("run");
    assert_eq!(
        one_line_error(&out, 1),
        "leakmon: --holders scans the native heap; --runtime asks the runtime's profiler: choose one\n"
    );
}
