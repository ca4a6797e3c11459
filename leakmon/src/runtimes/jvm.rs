//! A HotSpot JVM's own view of what it keeps, for a window, through its attach socket.
//!
//! With JFR: a recording of live-object samples for the window (see [`super::jfr`]),
//! written into the JVM's own /tmp, read through `/proc/PID/root` and removed. The
//! recording is started with a duration a little past the window, so a leakmon that
//! dies mid-window leaves nothing running.
//!
//! Without JFR (`-XX:-FlightRecorder`, a JVM built without it): the growth per class
//! between two class histograms. A histogram counts live objects only, so each one
//! costs a full collection; the frames then name classes, not code.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use super::{attach::Jvm, jfr, Frame, Stack};

/// How the samples were taken, for the report's note.
pub enum Source {
    Jfr,
    ClassHistogram,
}

/// Samples `pid`'s heap for `window` (or until `stop` says so).
pub fn profile(pid: u32, window: Duration, stop: &(dyn Fn() -> bool + Sync)) -> Result<(Vec<Stack>, Source)> {
    let jvm = Jvm::attach(pid)?;
    let name = format!("leakmon-{}-{pid}", std::process::id());
    // Inside the JVM's mount namespace: its /tmp, which it can write.
    let file = format!("/tmp/{name}.jfr");
    // Past the window, the JVM stops the recording itself.
    let lifetime = window.as_secs() + 120;
    // Only the events needed; a JDK 17 too old for event settings on the command line
    // gets the `profile` settings, which include them.
    let attempts = [
        format!(
            "JFR.start name={name} settings=none disk=false duration={lifetime}s filename={file} {}",
            jfr::SETTINGS.join(" ")
        ),
        format!("JFR.start name={name} settings=profile disk=false duration={lifetime}s filename={file}"),
    ];
    let mut refused = String::new();
    for start in &attempts {
        match jvm.jcmd(start) {
            Ok(out) if out.contains("Started recording") => {
                refused.clear();
                break;
            }
            Ok(out) => refused = out.trim().to_owned(),
            Err(e) => refused = format!("{e:#}"),
        }
        if refused.contains("disabled") {
            break;
        }
    }
    if !refused.is_empty() {
        info!(pid, answer = refused, "JFR unavailable: diffing class histograms instead");
        return histograms(&jvm, pid, window, stop).map(|s| (s, Source::ClassHistogram));
    }
    info!(pid, recording = name, "JFR recording started");
    wait(window, stop);
    let stopped = jvm.jcmd(&format!("JFR.stop name={name}"));
    let path = format!("/proc/{pid}/root{file}");
    let recording = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    stopped?;
    let recording = recording.with_context(|| format!("read pid {pid}'s recording {file}"))?;
    Ok((jfr::stacks(&recording).with_context(|| format!("parse pid {pid}'s recording"))?, Source::Jfr))
}

fn wait(window: Duration, stop: &(dyn Fn() -> bool + Sync)) {
    let deadline = Instant::now() + window;
    while Instant::now() < deadline && !stop() {
        std::thread::sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())));
    }
}

fn histograms(jvm: &Jvm, pid: u32, window: Duration, stop: &(dyn Fn() -> bool + Sync)) -> Result<Vec<Stack>> {
    let before = histogram(&jvm.jcmd("GC.class_histogram")?);
    wait(window, stop);
    let after = histogram(&jvm.jcmd("GC.class_histogram")?);
    if after.is_empty() {
        warn!(pid, "the class histogram named no classes");
    }
    let mut out: Vec<Stack> = after
        .into_iter()
        .filter_map(|(class, (count, bytes))| {
            let (count0, bytes0) = before.get(&class).copied().unwrap_or_default();
            (bytes > bytes0).then(|| Stack {
                frames: vec![Frame { function: class, file: String::new(), line: 0, column: 0 }],
                bytes: bytes - bytes0,
                samples: count.saturating_sub(count0),
            })
        })
        .collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes));
    Ok(out)
}

/// `GC.class_histogram`'s rows: `num: #instances #bytes class name (module)`.
fn histogram(text: &str) -> HashMap<String, (u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            fields.next()?.strip_suffix(':')?.parse::<u64>().ok()?;
            let count = fields.next()?.parse().ok()?;
            let bytes = fields.next()?.parse().ok()?;
            Some((fields.next()?.to_owned(), (count, bytes)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_histogram_row_gives_the_class_its_count_and_bytes() {
        let text = "12345:\n num     #instances         #bytes  class name (module)\n-------------------------------------------------------\n   1:         10321         862696  [B (java.base@17.0.15)\n   2:          2000          64000  java.util.HashMap$Node (java.base@17.0.15)\nTotal         12321         926696\n";
        let rows = histogram(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows["[B"], (10321, 862696));
        assert_eq!(rows["java.util.HashMap$Node"], (2000, 64000));
    }
}
