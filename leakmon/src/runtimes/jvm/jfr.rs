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

use super::super::{
    held_by::{Holder, Root, Step},
    Frame, Stack,
};

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

/// [`SETTINGS`], with `paths` the time JFR may spend finding the paths from GC roots
/// to the samples when they are dumped.
pub fn settings(paths: Option<std::time::Duration>) -> Vec<String> {
    SETTINGS
        .iter()
        .map(|s| match (paths, s.strip_prefix("+jdk.OldObjectSample#cutoff=")) {
            (Some(cutoff), Some(_)) => format!("+jdk.OldObjectSample#cutoff={}ms", cutoff.as_millis().max(1)),
            _ => (*s).to_owned(),
        })
        .collect()
}

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
    let mut live: HashMap<Vec<Frame>, u64> = HashMap::new();
    let (per_sample, in_flight) = live_samples(recording, &mut |sample| {
        let frames = sample.get_field("stackTrace").map(frames).unwrap_or_default();
        *live.entry(frames).or_default() += 1;
    })?;
    let mut out: Vec<Stack> = live
        .into_iter()
        .map(|(frames, samples)| Stack { frames, bytes: samples.saturating_mul(per_sample), samples })
        .collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.samples.cmp(&a.samples)));
    Ok(Held { stacks: out, per_sample, in_flight })
}

/// Gives `sample` each old-object sample of `recording` old enough to call held;
/// returns the bytes each stands for (the sampling points' allocation over their
/// number) and how many were too young (in flight).
fn live_samples(recording: &[u8], sample: &mut dyn FnMut(&Accessor)) -> Result<(u64, u64)> {
    let mut reader = JfrReader::new(std::io::Cursor::new(recording));
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
                    } else {
                        sample(&value);
                    }
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
    Ok((allocated.checked_div(points).unwrap_or(0), in_flight))
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

/// What a recording dumped with `path-to-gc-roots=true` says holds the live samples:
/// per sample, JFR's path from a GC root to it. The holder is the static field on the
/// path nearest the root (a field of a `java.lang.Class`: `Class.FIELD`), else the
/// root JFR names (a thread's stack, JNI, ...). Samples are grouped by holder and
/// type; each stands for `per_sample` bytes. The objects younger than
/// [`crate::store::live::IN_FLIGHT_MS`] are left out, as in [`stacks`].
pub fn holders(recording: &[u8]) -> Result<(Vec<Holder>, u64, u64)> {
    let mut groups: HashMap<(Root, String), (u64, Vec<Step>)> = HashMap::new();
    let (per_sample, _) = live_samples(recording, &mut |sample| {
        let (kind, root, path) = chain(sample);
        groups.entry((root, kind)).or_insert_with(|| (0, path)).0 += 1;
    })?;
    let samples: u64 = groups.values().map(|(n, _)| n).sum();
    let mut out: Vec<Holder> = groups
        .into_iter()
        .map(|((root, kind), (n, path))| Holder {
            bytes: n.saturating_mul(per_sample),
            objects: n,
            kind,
            root,
            path,
        })
        .collect();
    out.sort_by(|a, b| b.objects.cmp(&a.objects).then_with(|| a.root.name.cmp(&b.root.name)));
    out.truncate(crate::runtimes::held_by::MAX_HOLDERS);
    Ok((out, per_sample, samples))
}

/// Links of a path followed at most (JFR keeps paths short, skipping the middle of
/// long ones).
const MAX_LINKS: usize = 256;

/// A sample's type, its holder and the path from the holder to it.
fn chain(sample: &Accessor) -> (String, Root, Vec<Step>) {
    let Some(object) = sample.get_field("object") else {
        return (
            "(unknown)".to_owned(),
            Root { kind: "unknown", name: String::new(), scope: None },
            Vec::new(),
        );
    };
    let kind = class_name(&object).unwrap_or_else(|| "(unknown)".to_owned());
    // From the sample up: each link's name (field or index), and the referrer's class
    // and description.
    let mut links: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    let mut at = object;
    while links.len() < MAX_LINKS {
        let Some(reference) = at.get_field("referrer") else { break };
        let name = match (reference.get_field("field"), reference.get_field("array")) {
            (Some(field), _) => text(&field, "name").unwrap_or_else(|| "?".to_owned()),
            (None, Some(array)) => format!("[{}]", long(&array, "index")),
            _ => "?".to_owned(),
        };
        let Some(next) = reference.get_field("object") else { break };
        let description =
            next.get_field("description").and_then(|d| <&str>::try_from(d.value).ok().map(str::to_owned));
        links.push((name, class_name(&next), description));
        at = next;
    }
    // The static field nearest the root: a link from a class's mirror.
    let statics = links.iter().rposition(|(_, class, _)| class.as_deref() == Some("java.lang.Class"));
    let (root, below) = match statics {
        Some(i) => {
            let class = links[i]
                .2
                .as_deref()
                .and_then(|d| d.strip_prefix("Class Name: "))
                .unwrap_or_default()
                .to_owned();
            let field = &links[i].0;
            let name = if class.is_empty() { field.clone() } else { format!("{class}.{field}") };
            (Root { kind: "static", name, scope: None }, i)
        }
        None => (gc_root(sample), links.len()),
    };
    let path = links[..below].iter().rev().take(12).map(|(name, _, _)| Step { name: name.clone() }).collect();
    (kind, root, path)
}

/// JFR's root of a sample's path: a thread's stack, JNI, ... by its description.
fn gc_root(sample: &Accessor) -> Root {
    let Some(root) = sample.get_field("root") else {
        return Root { kind: "unknown", name: String::new(), scope: None };
    };
    let description = text(&root, "description").unwrap_or_default();
    let system = root.get_field("system").and_then(|s| text(&s, "system")).unwrap_or_default();
    let kind = match system.as_str() {
        "Threads" => "thread",
        "JNI Global" | "JNI Handles" => "jni",
        "Class Loader Data" | "Universe" | "System Dictionary" => "class-loader",
        _ => "gc-root",
    };
    Root { kind, name: description, scope: None }
}

/// An `OldObject`'s class name.
fn class_name(object: &Accessor) -> Option<String> {
    let class = object.get_field("type")?;
    symbol(&class, "name").map(|c| c.replace('/', "."))
}

/// A string field's text.
fn text(value: &Accessor, field: &str) -> Option<String> {
    <&str>::try_from(value.get_field(field)?.value).ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recording of tests/fixtures/jvm/CacheLeak.java (OpenJDK 17, 8 s of JFR's
    /// old-object samples, dumped with `path-to-gc-roots=true`): the samples that the
    /// cache keeps are held by the static field `CacheLeak.CACHE`, through the map's
    /// table.
    #[test]
    fn samples_are_held_by_the_static_field_nearest_the_root() {
        let recording = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/runtimes/jvm/testdata/paths_to_gc_roots.jfr"
        ))
        .expect("the recording");
        let (holders, _, samples) = holders(&recording).expect("parses");
        assert!(samples > 0);
        let cache: u64 = holders.iter().filter(|h| h.root.name == "CacheLeak.CACHE").map(|h| h.objects).sum();
        assert!(cache * 10 >= samples * 9, "{cache} of {samples} samples through CACHE: {holders:?}");
        let top = &holders[0];
        assert_eq!((top.root.kind, top.root.name.as_str()), ("static", "CacheLeak.CACHE"));
        assert_eq!(top.path.first().map(|s| s.name.as_str()), Some("table"), "{top:?}");
    }
}
