//! A HotSpot JVM's own view of what it keeps, for a window, through its attach socket.
//!
//! With JFR: a recording of live-object samples (see [`jfr`]); each snapshot is
//! a dump written into the JVM's own /tmp, read through `/proc/PID/root` and removed.
//! The recording is started with a duration past the time leakmon wants it, so a
//! leakmon that dies meanwhile leaves nothing running.
//!
//! Without JFR (`-XX:-FlightRecorder`, a JVM built without it): the growth per class
//! between two class histograms. A histogram counts live objects only, so each one
//! costs a full collection; the frames then name classes, not code.

use std::{collections::HashMap, os::fd::AsFd as _, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use tracing::{info, warn};

pub mod attach;
pub mod jfr;

use self::attach::Jvm as Attached;
use super::{
    guardian::{Guard, Guarded},
    Frame, Options, Profiler, Stack, Support,
};
use crate::untrusted::{read_regular, remove_owned, Identity, TargetRoot};

/// The largest recording read: old-object samples and allocation samples of a window
/// are a few MiB.
const RECORDING_LIMIT: u64 = 512 << 20;

/// JFR (or class histograms) running in a JVM until [`Profiler::close`].
pub struct Jvm {
    pid: u32,
    attached: Attached,
    how: How,
    /// Stops the recording if this leakmon cannot (see [`super::super::guardian`]).
    guard: Option<Guard>,
}

enum How {
    /// The recording's name (its files in the JVM's /tmp are named after it, see
    /// [`remove_recordings`]), and the dumps taken.
    Jfr {
        name: String,
        dumps: u32,
        /// The bytes each live sample of the last dump stood for (one allocation
        /// buffer's worth, on average): JFR's interval, not leakmon's to set.
        per_sample: Option<u64>,
        /// The last dump's samples of objects too young to call held.
        in_flight: u64,
    },
    /// The histogram at the start.
    Histograms(HashMap<String, (u64, u64)>),
    Closed,
}

impl Jvm {
    /// Attaches to `pid` and starts a recording that ends by itself after `lifetime`.
    /// Without JFR, class histograms if `histograms` allows their full collections,
    /// else an error.
    pub fn open(pid: u32, lifetime: Duration, histograms: bool) -> Result<Self> {
        Self::open_with(pid, lifetime, histograms, None)
    }

    /// [`Jvm::open`], with `paths` the time JFR may spend finding the paths from GC
    /// roots to its samples when they are dumped (none: no paths).
    pub fn open_with(
        pid: u32,
        lifetime: Duration,
        histograms: bool,
        paths: Option<Duration>,
    ) -> Result<Self> {
        let attached = Attached::attach(pid)?;
        let name = format!("leakmon-{}-{pid}", std::process::id());
        // Inside the JVM's mount namespace: its /tmp, which it can write.
        let file = format!("/tmp/{name}.jfr");
        let lifetime = lifetime.as_secs().max(1);
        // Only the events needed; a JDK 17 too old for event settings on the command
        // line gets the `profile` settings, which include them.
        let attempts = [
            format!(
                "JFR.start name={name} settings=none disk=false duration={lifetime}s filename={file} {}",
                jfr::settings(paths).join(" ")
            ),
            format!("JFR.start name={name} settings=profile disk=false duration={lifetime}s filename={file}"),
        ];
        let mut refused = String::new();
        // In place before the recording starts: a leakmon gone from here on leaves it to
        // the guardian to stop.
        let mut guard = Guard::of(pid, &Guarded::Recording(name.clone()))?;
        guard.armed()?;
        for start in &attempts {
            match attached.jcmd(start) {
                Ok(out) if out.contains("Started recording") => {
                    info!(pid, recording = name, "JFR recording started");
                    return Ok(Self {
                        pid,
                        attached,
                        how: How::Jfr { name, dumps: 0, per_sample: None, in_flight: 0 },
                        guard: Some(guard),
                    });
                }
                Ok(out) => refused = out.trim().to_owned(),
                Err(e) => refused = format!("{e:#}"),
            }
            if refused.contains("disabled") {
                break;
            }
        }
        if !histograms {
            bail!("pid {pid}: JFR is unavailable ({refused}); class histograms would cost a full collection each");
        }
        info!(pid, answer = refused, "JFR unavailable: diffing class histograms instead");
        guard.closed();
        let first = histogram(&attached.jcmd("GC.class_histogram")?);
        Ok(Self { pid, attached, how: How::Histograms(first), guard: None })
    }

    /// Whether the figures are per class rather than per stack.
    pub fn per_class(&self) -> bool {
        matches!(self.how, How::Histograms(_))
    }

    fn stop(&mut self) -> Result<()> {
        if let How::Jfr { name, .. } = &self.how {
            let stopped = self.attached.jcmd(&format!("JFR.stop name={name}"));
            remove_recordings(self.pid, name);
            if stopped.is_ok() {
                if let Some(guard) = self.guard.take() {
                    guard.closed();
                }
            }
            // Else the guard goes with this value, and its guardian tries again.
            stopped?;
        }
        Ok(())
    }

    /// Reads a recording the JVM wrote into its /tmp: inside its root, never through a
    /// link, a regular file its own user wrote, bounded; then removes it.
    fn take_recording(&self, name: &str, file: &str) -> Result<Vec<u8>> {
        let pid = self.pid;
        let root =
            TargetRoot::of(Path::new("/proc"), pid).with_context(|| format!("open pid {pid}'s root"))?;
        let fd = root.open(Path::new(file), libc::O_RDONLY | libc::O_NONBLOCK);
        remove_recordings(pid, name);
        let fd = fd.with_context(|| format!("open pid {pid}'s recording {file}"))?;
        let owner = Identity::of(Path::new("/proc"), pid)?.uid;
        let meta = std::fs::File::from(fd);
        if std::os::unix::fs::MetadataExt::uid(&meta.metadata()?) != owner {
            bail!("pid {pid}'s recording {file} is not its user's: not read");
        }
        Ok(read_regular(meta, RECORDING_LIMIT, file)?)
    }
}

/// What holds the objects a `window` left alive in the JVM `pid`: JFR's old-object
/// samples, dumped at the window's end with their paths from GC roots (the JVM holds
/// still while it finds them, for at most `budget`). `stop` ends the window early.
pub fn holders(
    pid: u32,
    window: Duration,
    budget: Duration,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<super::held_by::Found> {
    let mut jvm = Jvm::open_with(pid, window + Duration::from_secs(120), false, Some(budget))?;
    let deadline = std::time::Instant::now() + window;
    while std::time::Instant::now() < deadline && !stop() {
        std::thread::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(std::time::Instant::now())),
        );
    }
    let How::Jfr { name, .. } = &jvm.how else { bail!("pid {pid} records no JFR") };
    // Named as the recording's dumps are, so that whoever removes those removes it.
    let (name, file) = (name.clone(), format!("/tmp/{name}-0.jfr"));
    let started = std::time::Instant::now();
    let dumped = jvm.attached.jcmd_within(
        &format!("JFR.dump name={name} filename={file} path-to-gc-roots=true"),
        budget + Duration::from_secs(120),
    );
    let pause = started.elapsed();
    let recording = jvm.take_recording(&name, &file);
    let stopped = jvm.stop();
    dumped?;
    let recording = recording.with_context(|| format!("read pid {pid}'s recording {file}"))?;
    stopped?;
    let (holders, per_sample, objects) =
        jfr::holders(&recording).with_context(|| format!("parse pid {pid}'s recording"))?;
    let how = format!(
        "JFR's old-object samples alive at the window's end (one per allocation buffer, {} each on average), by the static field nearest the GC root on the path JFR found to each (else the root it names: a thread's stack, JNI); dumping them with their paths held the JVM for {:.0} ms. JFR keeps one path per object, the first it finds: a map a thread also holds in a local is named by that thread",
        crate::units::rounded(per_sample),
        pause.as_secs_f64() * 1e3
    );
    Ok(super::held_by::Found {
        holders,
        bytes: objects.saturating_mul(per_sample),
        objects,
        pause,
        heap_used: 0,
        how,
    })
}

/// Says in a report that the JVM's figures are per class, not per stack.
pub const JVM_CLASS_HISTOGRAM: &str = "JFR is unavailable in this JVM: the figures are the growth of each class between two class histograms (each a full collection), not allocation stacks";

impl Profiler for Jvm {
    fn snapshot(&mut self) -> Result<Vec<Stack>> {
        let pid = self.pid;
        match &mut self.how {
            How::Jfr { name, dumps, .. } => {
                *dumps += 1;
                let (name, file) = (name.clone(), format!("/tmp/{name}-{dumps}.jfr"));
                let dumped = self.attached.jcmd(&format!("JFR.dump name={name} filename={file}"));
                let recording = self.take_recording(&name, &file);
                dumped?;
                let recording = recording.with_context(|| format!("read pid {pid}'s recording {file}"))?;
                let held = jfr::stacks(&recording).with_context(|| format!("parse pid {pid}'s recording"))?;
                if let How::Jfr { per_sample, in_flight, .. } = &mut self.how {
                    *per_sample = (held.per_sample > 0).then_some(held.per_sample);
                    *in_flight = held.in_flight;
                }
                Ok(held.stacks)
            }
            How::Closed => bail!("pid {pid}'s recording is closed"),
            How::Histograms(before) => {
                let after = histogram(&self.attached.jcmd("GC.class_histogram")?);
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
                out.sort_by_key(|s| std::cmp::Reverse(s.bytes));
                Ok(out)
            }
        }
    }

    fn close(mut self: Box<Self>) -> Result<()> {
        let stopped = self.stop();
        self.how = How::Closed;
        stopped
    }

    fn notes(&self, _stacks: &[Stack]) -> Vec<String> {
        if self.per_class() {
            return vec![JVM_CLASS_HISTOGRAM.to_owned()];
        }
        match self.interval() {
            Some(bytes) => vec![format!(
                "JFR keeps one object per allocation buffer (TLAB) a thread fills, {} on average in this window: what code kept below about {} in it may not show, and --sample-bytes does not change that (the JVM sizes its buffers); a longer window does",
                crate::units::rounded(bytes),
                crate::units::rounded(bytes.saturating_mul(3))
            )],
            None => Vec::new(),
        }
    }

    fn interval(&self) -> Option<u64> {
        match &self.how {
            How::Jfr { per_sample, .. } => *per_sample,
            _ => None,
        }
    }

    fn in_flight(&self) -> Option<(u64, u64)> {
        match &self.how {
            How::Jfr { per_sample: Some(bytes), in_flight, .. } if *in_flight > 0 => {
                Some((bytes.saturating_mul(*in_flight), *in_flight))
            }
            _ => None,
        }
    }
}

/// HotSpot: the JDK's classes are library code; found by its `libjvm.so`; JFR's
/// old-object samples (or class histograms where JFR is missing), through the attach
/// protocol.
pub struct JvmSupport;

pub static JVM: JvmSupport = JvmSupport;

impl Support for JvmSupport {
    fn name(&self) -> &'static str {
        "jvm"
    }

    fn title(&self) -> &'static str {
        "a HotSpot JVM"
    }

    fn sets_its_own_interval(&self) -> bool {
        true
    }

    fn library_code(&self, function: &str, _file: Option<&str>) -> bool {
        ["java.", "javax.", "jdk.", "sun.", "com.sun."].iter().any(|p| function.starts_with(p))
    }

    fn runs(&self, _exe: &str, maps: &str) -> bool {
        maps.lines().any(|l| l.ends_with("/libjvm.so"))
    }

    fn profiler(&self, pid: u32, options: Options) -> Option<Result<Box<dyn Profiler>>> {
        Some(Jvm::open(pid, options.lifetime, options.histograms).map(|j| Box::new(j) as Box<dyn Profiler>))
    }
}

impl Drop for Jvm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Removes the files of the recording `name` from the JVM `pid`'s /tmp: `<name>.jfr`
/// and `<name>-<n>.jfr`, if its user wrote them (regular files, never a link).
pub fn remove_recordings(pid: u32, name: &str) {
    let proc = Path::new("/proc");
    let (Ok(root), Ok(who)) = (TargetRoot::of(proc, pid), Identity::of(proc, pid)) else { return };
    let Ok((tmp, names)) = root.names(Path::new("/tmp"), 100_000) else { return };
    for file in names {
        let ours = file.strip_prefix(name).is_some_and(|rest| {
            rest == ".jfr"
                || rest
                    .strip_prefix('-')
                    .and_then(|n| n.strip_suffix(".jfr"))
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        });
        if ours {
            let _ = remove_owned(tmp.as_fd(), &file, who.uid);
        }
    }
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
