//! What holds the objects a window left alive in a Node.js process, through its
//! inspector: a heap snapshot when the window begins and one when it ends. V8 gives
//! each object it has seen an id, in order, and keeps it while the object lives (moves
//! included); the objects of the second snapshot with ids past the first's are the
//! window's, and [`super::held`] finds their holders.
//!
//! A snapshot stops the process while V8 writes it, up to about 11 s per 100 MB of
//! heap on current Node.js (published measurements; 0.4 s per 100 MB here, Node.js 20
//! and a heap of small objects), and takes up to twice the heap: the pause is
//! estimated from the heap's size first (for the last snapshot, at the rate the first
//! took, with half again for margin), and a snapshot that would hold the process longer
//! than the budget is not taken.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::json;
use tracing::info;

use super::{snapshot::Parser, Node};
pub use crate::runtimes::held_by::Found;

/// Seconds a snapshot holds the process per byte of heap, before one was measured
/// (11 s per 100 MB, the published figure).
const SECONDS_PER_BYTE: f64 = 11.0 / 100e6;
/// The margin on a rate measured by the first snapshot.
const MARGIN: f64 = 1.5;
/// The most snapshot text read (its numbers are kept, not its text).
const SNAPSHOT_LIMIT: u64 = 16 << 30;

/// Holds `pid`'s objects of a `window` to their holders, each snapshot within
/// `budget`; `stop` ends the window early. Runs in the process's network namespace.
pub fn holders(
    pid: u32,
    window: Duration,
    budget: Duration,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Found> {
    crate::runtimes::in_net_namespace(pid, || {
        let mut node = Node::open_inspector(pid)?;
        let found = window_of(&mut node, window, budget, stop);
        let closed = node.finish();
        let found = found?;
        closed?;
        Ok(found)
    })
}

fn window_of(
    node: &mut Node,
    window: Duration,
    budget: Duration,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Found> {
    let pid = node.pid;
    let (first, used, _) = snapshot(node, budget, None, false)?;
    // The rate the first one took, for the last one's estimate.
    let rate = (used > 0.0 && first > Duration::ZERO).then(|| first.as_secs_f64() / used * MARGIN);
    let baseline = watermark(node)?;
    info!(pid, baseline, pause_ms = first.as_secs_f64() * 1e3, "first heap snapshot taken");
    let deadline = Instant::now() + window;
    while Instant::now() < deadline && !stop() {
        std::thread::sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())));
    }
    let (last, heap_used, parser) = snapshot(node, budget, rate, true)?;
    let heap_used = heap_used as u64;
    let snapshot = parser.finish().context("parse the heap snapshot")?;
    let (holders, bytes, objects) = super::held::held(&snapshot, baseline);
    info!(pid, pause_ms = last.as_secs_f64() * 1e3, objects, bytes, "last heap snapshot read");
    let pause = first.max(last);
    let how = format!(
        "The objects allocated in the window (after its first heap snapshot) and alive at its end, by the variable that holds them; each snapshot held the process still, the longer for {:.0} ms ({} MB of heap before the last)",
        pause.as_secs_f64() * 1e3,
        heap_used / 1_000_000
    );
    Ok(Found { holders, bytes, objects, pause, heap_used, how })
}

/// The first id V8 will give an object not yet seen: that of a fresh one, asked for
/// right after a snapshot gave every live object its id. The object is let go.
fn watermark(node: &mut Node) -> Result<u64> {
    let session = node.session()?;
    let made =
        session.call("Runtime.evaluate", &json!({ "expression": "({})", "objectGroup": "leakmon" }))?;
    let object = made["result"]["objectId"].as_str().context("no object to take an id from")?.to_owned();
    let id = session.call("HeapProfiler.getHeapObjectId", &json!({ "objectId": object }));
    let _ = session.call("Runtime.releaseObjectGroup", &json!({ "objectGroup": "leakmon" }));
    id?["heapSnapshotObjectId"].as_str().and_then(|v| v.parse().ok()).context("V8 gave the object no id")
}

/// Takes a heap snapshot unless the heap's size, at `rate` seconds a byte (else the
/// published figure), says it would take longer than `budget`: its pause, the heap's
/// size before it, and with `keep` its text parsed.
fn snapshot(
    node: &mut Node,
    budget: Duration,
    rate: Option<f64>,
    keep: bool,
) -> Result<(Duration, f64, Parser)> {
    let pid = node.pid;
    let session = node.session()?;
    let usage = session.call("Runtime.getHeapUsage", &json!({}))?;
    let used = usage["usedSize"].as_f64().unwrap_or(0.0);
    let estimate = Duration::from_secs_f64(used * rate.unwrap_or(SECONDS_PER_BYTE));
    if estimate > budget {
        let measured =
            if rate.is_some() { "at the rate its first snapshot took" } else { "about 11 s per 100 MB" };
        bail!(
            "a heap snapshot of pid {pid} would hold it still for about {:.1} s (its heap holds {:.0} MB; {measured}), past the budget of {:.1} s: none was taken (--holders-budget allows more)",
            estimate.as_secs_f64(),
            used / 1e6,
            budget.as_secs_f64()
        );
    }
    let mut parser = Parser::default();
    let started = Instant::now();
    session.call_with(
        "HeapProfiler.takeHeapSnapshot",
        &json!({ "reportProgress": false }),
        (budget * 4).max(Duration::from_secs(60)),
        &mut |event, params| {
            if event == "HeapProfiler.addHeapSnapshotChunk" && keep {
                parser.feed(params["chunk"].as_str().unwrap_or(""))?;
                if parser.read > SNAPSHOT_LIMIT {
                    bail!("pid {pid}'s heap snapshot is past {} GiB of text: not read", SNAPSHOT_LIMIT >> 30);
                }
            }
            Ok(())
        },
    )?;
    Ok((started.elapsed(), used, parser))
}
