//! What a JFR recording says is still held, per Java call stack.
//!
//! JFR's old-object sampler (`jdk.OldObjectSample`) takes the first object of each new
//! allocation buffer (TLAB) and of each allocation outside one, keeps the sample while
//! the object lives, and writes the survivors, with the stack that allocated them, when
//! the recording stops. So each live sample stands for about one buffer's worth of
//! allocation: the recording's `jdk.ObjectAllocationInNewTLAB` and
//! `jdk.ObjectAllocationOutsideTLAB` events, taken at the same points, give that
//! figure (bytes allocated over sampling points).

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use jfrs::reader::{event::Accessor, JfrReader};

use super::super::{Frame, Stack};

/// The events leakmon asks for, as `JFR.start` settings: live-object samples with
/// their stacks, and the sampling points without (one event per buffer, no stack walk).
pub const SETTINGS: &[&str] = &[
    "+jdk.OldObjectSample#enabled=true",
    "+jdk.OldObjectSample#stackTrace=true",
    "+jdk.OldObjectSample#cutoff=0ns",
    "+jdk.ObjectAllocationInNewTLAB#enabled=true",
    "+jdk.ObjectAllocationInNewTLAB#stackTrace=false",
    "+jdk.ObjectAllocationOutsideTLAB#enabled=true",
    "+jdk.ObjectAllocationOutsideTLAB#stackTrace=false",
];

/// What a recording says is held.
#[derive(Debug, Default)]
pub struct Held {
    /// Per stack, most bytes first.
    pub stacks: Vec<Stack>,
    /// The bytes each sample stands for (0 when the recording has no sampling points).
    pub per_sample: u64,
    /// Samples of objects younger than [`crate::store::live::IN_FLIGHT_MS`] when the
    /// recording was dumped, set apart as the agent's blocks are: most are a request's
    /// scratch, alive only because the dump came in the middle of it.
    pub in_flight: u64,
}

/// What a recording says is held.
pub fn stacks(recording: &[u8]) -> Result<Held> {
    let mut reader = JfrReader::new(std::io::Cursor::new(recording));
    let mut live: HashMap<Vec<Frame>, u64> = HashMap::new();
    let (mut allocated, mut points, mut in_flight) = (0u64, 0u64, 0u64);
    for chunk in reader.chunks() {
        let (mut chunk_reader, chunk) = chunk.context("a JFR chunk")?;
        let ticks_per_ms = (chunk.header.ticks_per_second / 1000).max(1) as u64;
        for event in chunk_reader.events(&chunk) {
            let event = event.context("a JFR event")?;
            let value = event.value();
            match event.class.name() {
                "jdk.OldObjectSample" => {
                    // An event without an age (an older JDK) counts as held.
                    let age = value.get_field("objectAge").map_or(u64::MAX, |_| long(&value, "objectAge"));
                    if age / ticks_per_ms < crate::store::live::IN_FLIGHT_MS {
                        in_flight += 1;
                        continue;
                    }
                    let frames = value.get_field("stackTrace").map(frames).unwrap_or_default();
                    *live.entry(frames).or_default() += 1;
                }
                "jdk.ObjectAllocationInNewTLAB" => {
                    allocated = allocated.saturating_add(long(&value, "tlabSize"));
                    points += 1;
                }
                "jdk.ObjectAllocationOutsideTLAB" => {
                    allocated = allocated.saturating_add(long(&value, "allocationSize"));
                    points += 1;
                }
                _ => {}
            }
        }
    }
    // A recording is the target's to write: sums saturate rather than wrap.
    let per_sample = allocated.checked_div(points).unwrap_or(0);
    let mut out: Vec<Stack> = live
        .into_iter()
        .map(|(frames, samples)| Stack { frames, bytes: samples.saturating_mul(per_sample), samples })
        .collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.samples.cmp(&a.samples)));
    Ok(Held { stacks: out, per_sample, in_flight })
}

fn long(value: &Accessor, field: &str) -> u64 {
    value.get_field(field).and_then(|v| <i64>::try_from(v.value).ok()).map_or(0, |v| v.max(0) as u64)
}

/// A stack trace's frames, innermost first: `package.Class.method` and the line.
fn frames(trace: Accessor) -> Vec<Frame> {
    let Some(list) = trace.get_field("frames").and_then(Accessor::as_iter) else {
        return Vec::new();
    };
    list.map(|frame| {
        let method = frame.get_field("method");
        let class = method.as_ref().and_then(|m| m.get_field("type")).and_then(|t| symbol(&t, "name")).map(
            |mut c| {
                // A hidden class (a lambda's, a method handle's) is named with its address
                // and a number: the same code in every run of the program without them.
                if let Some(at) = c.find("+0x") {
                    c.truncate(at);
                }
                c
            },
        );
        let name = method.as_ref().and_then(|m| symbol(m, "name")).unwrap_or_else(|| "(unknown)".to_owned());
        let line = frame.get_field("lineNumber").and_then(|l| <i32>::try_from(l.value).ok()).unwrap_or(0);
        Frame {
            function: match class {
                Some(class) => format!("{}.{name}", class.replace('/', ".")),
                None => name,
            },
            file: String::new(),
            line: line.max(0) as u32,
            column: 0,
        }
    })
    .collect()
}

/// A `Symbol` field's text.
fn symbol(value: &Accessor, field: &str) -> Option<String> {
    let symbol = value.get_field(field)?;
    let text = symbol.get_field("string")?;
    <&str>::try_from(text.value).ok().map(str::to_owned)
}
