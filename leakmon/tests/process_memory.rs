//! The always-on tier's readers side by side on a real process: the task iterator
//! gives exactly what /proc prints, per-CPU parts included, before and after the
//! process grows; and the daemon says which reader it uses.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
};

use common::{build_fixture, Reap};
use leakmon::{
    procfs::ProcRoot,
    sources::{proc_sampler, process_memory::ProcessMemory},
    values::MemorySource,
};

/// The sample of `pid` from each reader, read until the iterator gives the same twice
/// around the /proc read (nothing moved in between).
fn both(reader: &mut ProcessMemory, pid: u32) -> (proc_sampler::ProcSample, proc_sampler::ProcSample) {
    for _ in 0..20 {
        let find = |all: Vec<proc_sampler::ProcSample>| all.into_iter().find(|s| s.pid == pid);
        let before = find(reader.sample_all()).expect("the fixture in the iterator's pass");
        let proc = proc_sampler::sample(&ProcRoot::default(), pid).expect("the fixture in /proc");
        let after = find(reader.sample_all()).expect("the fixture in the iterator's pass");
        if before == after {
            return (after, proc);
        }
    }
    panic!("the fixture's counters never held still");
}

#[test]
fn the_iterator_gives_what_proc_prints_per_cpu_parts_included() {
    let fixture = build_fixture("touch_pages.c", &[]);
    let mut child = Reap(
        Command::new(&fixture)
            .arg("5")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the fixture"),
    );
    let pid = child.id();
    let mut stdin = child.0.stdin.take().expect("stdin");
    let mut out = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut reader =
        ProcessMemory::new(MemorySource::Iterator, ProcRoot::default()).expect("the iterator loads");
    assert_eq!(reader.source(), "iterator");
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
    let mut last_anon = 0;
    for step in 0..4 {
        line.clear();
        out.read_line(&mut line).expect("read the fixture");
        assert_eq!(line.trim(), "touched");
        let (iterated, proc) = both(&mut reader, pid);
        assert_eq!(iterated, proc, "step {step}");
        // Each step adds 5 pages per CPU (the first one adds the program's own too).
        if step > 0 {
            assert_eq!(iterated.anon_bytes - last_anon, 5 * 4096 * cpus, "step {step}");
        }
        last_anon = iterated.anon_bytes;
        writeln!(stdin, "more").expect("ask for more");
    }
}

#[test]
fn the_daemon_says_which_reader_it_uses_and_refuses_a_bad_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_leakmon"))
        .args(["run", "--memory-source", "sysfs"])
        .output()
        .expect("run leakmon");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value 'sysfs' for '--memory-source"), "{stderr}");
    let dir = tempfile::tempdir().expect("temp dir");
    for (source, listen) in [("iterator", "127.0.0.1:19562"), ("proc", "127.0.0.1:19561")] {
        let log = dir.path().join(format!("{source}.log"));
        let _daemon = common::start_daemon_logged(
            &["--sample-interval", "1s", "--memory-source", source],
            listen,
            &log,
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut text = String::new();
        while !text.contains("leakmon running") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
            text = std::fs::read_to_string(&log).unwrap_or_default();
        }
        let running =
            text.lines().find(|l| l.contains("leakmon running")).unwrap_or_else(|| panic!("{text}"));
        assert!(running.contains(&format!("memory_source=\"{source}\"")), "{running}");
        // A second tick came and went, with processes in it.
        std::thread::sleep(std::time::Duration::from_millis(2500));
        let body = common::http_get(listen, "/api/v1/processes").expect("processes");
        assert!(body.contains("\"comm\""), "{source}: {body}");
    }
}
