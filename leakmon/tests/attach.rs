//! How probes are attached: `uprobe_multi` links scoped to the watched process, the
//! perf-event fallback, and what is left in the kernel afterwards.

mod common;

use std::{fs::File, os::unix::fs::FileExt as _, path::PathBuf, process::Command};

use common::{build_fixture, by_function, expected, processes, report_json, Reap, LEAKS};
use leakmon::{
    probes::targets::{entry_points, Handler},
    procfs::ProcRoot,
};

fn release(fixture: &mut Reap) {
    let pid = nix::unistd::Pid::from_raw(fixture.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("signal fixture");
    assert!(fixture.wait().expect("wait fixture").success());
}

/// The libc `pid` maps, and the address there of the first byte of its `malloc`, where
/// leakmon's malloc probe goes (derived from the file, not from this machine's libc).
fn malloc_in(pid: u32) -> (PathBuf, u64) {
    let maps = ProcRoot::default().maps(pid).expect("read maps");
    let libc = maps
        .iter()
        .find(|m| {
            m.executable && m.path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))
        })
        .expect("libc mapped");
    let file = ProcRoot::default().in_root(pid, &libc.path);
    let malloc = entry_points(&file)
        .expect("libc's entry points")
        .into_iter()
        .find(|p| p.symbol == "malloc" && p.handler == Handler::Malloc)
        .expect("malloc in libc");
    let mapping = maps
        .iter()
        .find(|m| {
            m.inode == libc.inode
                && m.offset <= malloc.file_offset
                && malloc.file_offset < m.offset + (m.end - m.start)
        })
        .expect("malloc's page mapped");
    (file, mapping.start + (malloc.file_offset - mapping.offset))
}

/// The byte at `addr` in `pid`'s memory, as the process executes it.
fn byte_at(pid: u32, addr: u64) -> u8 {
    let mem = File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut byte = [0u8];
    mem.read_exact_at(&mut byte, addr).expect("read mem");
    byte[0]
}

const INT3: u8 = 0xcc;

/// The tests here look at breakpoints and links host-wide: one at a time (a report on
/// a command attaches system-wide while it runs).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `uprobe_multi` links on the host, by the kernel's own account (a bpftool older than
/// the link type names it by number: `BPF_LINK_TYPE_UPROBE_MULTI` is 12).
fn multi_links() -> usize {
    let out = Command::new("bpftool").args(["link", "show"]).output().expect("run bpftool");
    assert!(out.status.success(), "bpftool link show failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" uprobe_multi ") || l.contains(" type 12 "))
        .count()
}

#[test]
fn a_watched_process_alone_gets_breakpoints_and_its_forked_child_is_counted_exactly() {
    let _alone = alone();
    let links_before = multi_links();
    let mut watched = common::start_wait_then_leak(&["fork"]);
    let bystander = common::start_wait_then_leak(&[]);
    let (_, malloc_watched) = malloc_in(watched.id());
    let (_, malloc_bystander) = malloc_in(bystander.id());
    let original = byte_at(bystander.id(), malloc_bystander);
    assert_ne!(original, INT3, "the bystander's malloc is unprobed before leakmon starts");

    let (leakmon, stderr) = common::watch_pid(watched.id(), "60");
    assert_eq!(byte_at(watched.id(), malloc_watched), INT3, "the watched process has its breakpoint");
    assert_eq!(
        byte_at(bystander.id(), malloc_bystander),
        original,
        "a process that maps the same libc but is not watched has none"
    );
    assert!(multi_links() > links_before, "attached through uprobe_multi links");

    release(&mut watched);
    let report = common::finish_report(leakmon, stderr);
    let procs = processes(&report);
    assert_eq!(procs.len(), 2, "the process and the child it forked while watched: {report:#}");
    let of = |pid: Option<u32>| {
        procs
            .iter()
            .find(|p| pid.map_or(p["pid"] != watched.id(), |pid| p["pid"] == pid))
            .expect("process in the report")
    };
    assert_eq!(
        by_function(of(Some(watched.id())), "wait_then_leak.c"),
        expected(&[("leak_in_window", 16_000, 500)])
    );
    assert_eq!(by_function(of(None), "wait_then_leak.c"), expected(&[("leak_in_child", 14_400, 300)]));
    assert_eq!(multi_links(), links_before, "every link closed when the report is done");
    drop(bystander);
}

#[test]
fn the_perf_event_fallback_counts_exactly_and_says_so_once() {
    let _alone = alone();
    let fixture = build_fixture("leaks.c", &[]);
    let out = common::leakmon()
        .env("LEAKMON_PERF_UPROBES", "1")
        .env("RUST_LOG", "info")
        .args(["report", "--format", "json", "--"])
        .arg(&fixture)
        .output()
        .expect("run leakmon");
    let report = common::parse_report(&out);
    assert_eq!(by_function(&processes(&report)[0], "leaks.c"), expected(LEAKS));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("no uprobe_multi links").count(), 1, "said once: {stderr}");
    // And the same fixture through uprobe_multi links says nothing of the kind.
    let report = report_json(&[fixture.as_os_str()]);
    assert_eq!(by_function(&processes(&report)[0], "leaks.c"), expected(LEAKS));
}
