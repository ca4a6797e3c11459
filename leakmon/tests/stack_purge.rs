//! Stacks live in a kernel table shared by every traced process: once no totals entry
//! names a stack any more, the daemon's purge must drop it, or the table fills up on a
//! host that runs for months.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use common::{build_fixture, Reap};
use leakmon::probes::{Probes, Settings};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

#[test]
fn stacks_of_a_purged_process_go_at_the_second_purge() {
    let fixture = build_fixture("wait_then_leak.c", &[]);
    let mut probes = Probes::load(&Settings::default()).expect("load probes");
    let libc = common::system_libc();
    probes.attach_library(&libc).expect("attach libc");

    let mut child = Reap(Command::new(&fixture).stdout(Stdio::piped()).spawn().expect("start fixture"));
    let mut ready = String::new();
    BufReader::new(child.0.stdout.as_mut().expect("stdout")).read_line(&mut ready).expect("read");
    let pid = child.0.id();
    probes.trace(pid).expect("trace");
    kill(Pid::from_raw(pid as i32), Signal::SIGUSR1).expect("signal fixture");
    assert!(child.0.wait().expect("wait").success());

    let totals = probes.totals(|k| k.tgid == pid).expect("totals");
    let bytes: u64 = totals.iter().map(|(_, t)| t.bytes).sum();
    assert_eq!(bytes, 16_000, "leak_in_window: 500 x 32");
    let ids: Vec<u64> = totals.iter().map(|(k, _)| k.stack_id).collect();
    assert!(ids.iter().all(|&id| probes.stack(id).is_some_and(|f| !f.is_empty())), "stacks stored");

    assert_eq!(probes.live_blocks(pid).expect("live"), 500);

    let gone = |tgid: u32| tgid == pid;
    probes.purge(|tgid, _| gone(tgid), |tgid, _| gone(tgid)).expect("purge");
    assert!(probes.totals(|k| k.tgid == pid).expect("totals").is_empty(), "totals purged");
    // The purge walks the live table only for processes with unfreed blocks: this one.
    assert_eq!(probes.live_blocks(pid).expect("live"), 0, "live blocks purged");
    // A stack unreferenced at one purge may be about to be named by a totals entry the
    // kernel is writing: it stays until the next one.
    assert!(ids.iter().all(|&id| probes.stack(id).is_some()), "kept after one purge");
    probes.purge_stacks().expect("purge stacks");
    let left: Vec<u64> = ids.iter().copied().filter(|&id| probes.stack(id).is_some()).collect();
    assert!(left.is_empty(), "stacks left after two purges: {left:x?}");
}
