//! A process in mount and PID namespaces of its own (a container, as far as the kernel
//! is concerned), whose libc is a bind-mounted copy at the path the host's has: leakmon
//! must find that copy through /proc/PID/root and probe it, not the host's file.

mod common;

use common::{build_fixture, by_function, expected, processes, report_json, LEAKS};

#[test]
fn a_namespaced_process_with_a_bind_mounted_libc_is_accounted_exactly() {
    let fixture = build_fixture("leaks.c", &[]);
    // The host's own path for it (discovery names it through /proc/PID/root, which the
    // new namespace's /proc does not have).
    let libc = std::fs::canonicalize(common::system_libc()).expect("resolve libc");
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("libc.so.6");
    std::fs::copy(&libc, &copy).expect("copy libc");
    let script = format!("mount --bind {} {} && exec {}", copy.display(), libc.display(), fixture.display());
    let report = report_json(&[
        "unshare".as_ref(),
        "--mount".as_ref(),
        "--pid".as_ref(),
        "--fork".as_ref(),
        "--mount-proc".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
    ]);
    let leaks = processes(&report)
        .iter()
        .find(|p| p["comm"] == "leaks")
        .unwrap_or_else(|| panic!("the fixture is reported: {report:#}"));
    assert_eq!(by_function(leaks, "leaks.c"), expected(LEAKS), "{leaks:#}");
    assert_eq!(leaks["allocator"], "glibc");
    // Its stacks go through the copy's unwind tables down to _start.
    let small =
        leaks["stacks"].as_array().expect("stacks").iter().find(|s| s["site"]["function"] == "leak_small");
    let frames = small.expect("leak_small")["frames"].as_array().expect("frames");
    assert_eq!(frames.last().expect("frames")["function"], "_start", "{frames:#?}");
}
