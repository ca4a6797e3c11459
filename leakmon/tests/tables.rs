//! The kernel tables read in bulk: the per-stack totals of 131,072 real stacks (one
//! block from each of 2^17 call paths, `bench/hold.c stacks`), read in batches, are
//! exactly what reading them entry by entry gives; the time of each is printed (the
//! bench measures it at host scale).

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use leakmon::probes::{Probes, Settings};

#[test]
fn the_totals_of_131072_stacks_read_in_batches_are_the_entry_by_entry_ones() {
    const STACKS: usize = 1 << 17;
    let dir = tempfile::tempdir().expect("temp dir");
    let hold = dir.path().join("hold");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/hold.c");
    let status = Command::new("gcc")
        .args(["-O1", "-fno-builtin", "-fno-omit-frame-pointer", "-o"])
        .arg(&hold)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success(), "build hold.c");
    let settings =
        Settings { max_totals: 1 << 18, max_stacks: 1 << 18, max_live: 1 << 18, ..Settings::default() };
    let mut probes = Probes::load(&settings).expect("load probes");
    probes.attach_library(&common::system_libc()).expect("attach libc");
    // Traced before its first allocation: the shell waits for a line, then becomes it.
    let mut child = common::Reap(
        Command::new("sh")
            .arg("-c")
            .arg(format!("read go; exec {} stacks", hold.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start hold"),
    );
    let pid = child.0.id();
    probes.trace(pid).expect("trace");
    writeln!(child.0.stdin.as_mut().expect("stdin"), "go").expect("write");
    let mut ready = String::new();
    BufReader::new(child.0.stdout.as_mut().expect("stdout")).read_line(&mut ready).expect("read");
    assert_eq!(ready.trim(), "ready");
    let mine = |k: &leakmon_common::TotalsKey| k.tgid == pid;
    let timed = |read: &dyn Fn() -> Vec<(leakmon_common::TotalsKey, leakmon_common::Totals)>| {
        let started = Instant::now();
        let mut all = read();
        let took = started.elapsed();
        all.sort_by_key(|(k, _)| (k.tgid, k.stack_id));
        (all, took)
    };
    let (batched, batch_time) = timed(&|| probes.totals(mine).expect("totals"));
    let (one_by_one, entry_time) = timed(&|| probes.totals_by_entry(mine).expect("totals"));
    let leaked: usize = batched.iter().filter(|(_, t)| t.bytes == 24).map(|(_, t)| t.allocs as usize).sum();
    assert!(leaked >= STACKS, "{leaked} blocks of 24 bytes in {} stacks", batched.len());
    assert_eq!(batched.len(), one_by_one.len());
    assert!(batched == one_by_one, "the batched read differs from the entry-by-entry one");
    eprintln!(
        "{} stacks' totals: in batches {:.1} ms, entry by entry {:.1} ms ({:.1}x)",
        batched.len(),
        batch_time.as_secs_f64() * 1e3,
        entry_time.as_secs_f64() * 1e3,
        entry_time.as_secs_f64() / batch_time.as_secs_f64().max(1e-9)
    );
    assert!(batch_time < Duration::from_secs(10));
}
