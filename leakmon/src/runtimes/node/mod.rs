//! V8's sampling heap profiler, driven in a running Node.js for a window.
//!
//! The profiler samples allocations byte-weighted (every `interval` bytes on average)
//! and keeps a sample only while its object lives, so the profile at the end of the
//! window is what the window's allocations still hold, per JavaScript call stack.
//! leakmon opens the inspector (SIGUSR1), starts sampling, reads the profile when the
//! window ends, stops sampling and closes the inspector again.
//!
//! Refused in one line, leaving the process as it was: a process whose inspector is
//! already open (someone's debugging session), and one that opens none after SIGUSR1
//! (`--disable-sigusr1`, or a program that handles SIGUSR1 itself).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use tracing::{info, warn};

pub mod held;
pub mod holders;
pub mod inspector;
pub mod notes;
pub mod pace;
pub mod port_guard;
pub mod snapshot;

use self::{
    inspector::{inspector_address, is_inspector, listeners, listening, loopback, Session},
    port_guard::PortGuard,
};
use super::{guardian::Guard, Frame, Options, Profiler, Stack, Support};
use crate::{
    untrusted::{read_text, Identity, Pinned, PROC_TEXT_LIMIT},
    values::Interval,
};

/// Closes the inspector once the current session has ended. Not at once
/// (`setImmediate`): a close while the session was still being torn down crashed
/// Node.js 20 (SIGSEGV) in about half of the 20 s runs; 250 ms later, none of six.
pub const CLOSE: &str =
    "(() => { const inspector = require('inspector'); setTimeout(() => { try { inspector.close(); } catch (e) {} }, 250); })()";

/// How long the inspector has to open after SIGUSR1, and to close at the end.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// V8's sampling heap profiler, running in a Node.js process until [`Profiler::close`].
pub struct Node {
    pid: u32,
    addr: SocketAddr,
    session: Option<Session>,
    /// The sampling interval in use.
    interval: u64,
    /// Whether V8's sampling heap profiler was started (a holders snapshot runs none).
    sampling: bool,
    /// Closes the inspector if this leakmon cannot (see [`super::super::guardian`]).
    guard: Option<Guard>,
    /// Keeps the port to root and the process's user while it is open; dropped last.
    _port: PortGuard,
}

impl Node {
    /// Opens `pid`'s inspector and starts sampling at `interval`: where it is paced,
    /// at the one its allocation rate calls for (see [`pace`]).
    pub fn open(pid: u32, interval: Interval) -> Result<Self> {
        let mut node = Self::open_inspector(pid)?;
        let bytes = match interval {
            Interval::Paced(start) => node.pace(start)?,
            Interval::Fixed(bytes) => bytes,
        };
        node.interval = bytes;
        node.sampling = true;
        node.session()?.call("HeapProfiler.startSampling", &json!({ "samplingInterval": bytes }))?;
        info!(pid, interval = bytes, paced = interval.paced(), "V8's sampling heap profiler started");
        Ok(node)
    }

    /// Opens `pid`'s inspector, with a session whose heap profiler is enabled; closed
    /// again on [`Profiler::close`] or drop.
    pub fn open_inspector(pid: u32) -> Result<Self> {
        let proc_root = Path::new("/proc");
        // Pinned: every check is of this process, and SIGUSR1 goes to it or to none.
        let process = Pinned::open(pid).with_context(|| format!("no process {pid}"))?;
        let before = listening(pid)?;
        if let Some(open) = before.iter().find(|a| is_inspector(**a)) {
            bail!(
                "pid {pid} already has an inspector open on {open} (a debugging session): leakmon leaves it alone"
            );
        }
        // A process that does not catch SIGUSR1 dies of it: it is no Node.js whose
        // inspector the signal opens (a program named node, or --disable-sigusr1).
        if !process.catches(proc_root, libc::SIGUSR1).with_context(|| format!("no process {pid}"))? {
            bail!(
                "pid {pid} does not catch SIGUSR1, which would end it: not a Node.js whose inspector SIGUSR1 opens (or one started with --disable-sigusr1); nothing was sent"
            );
        }
        let args = read_text(Path::new(&format!("/proc/{pid}/cmdline")), PROC_TEXT_LIMIT).unwrap_or_default();
        let environ =
            read_text(Path::new(&format!("/proc/{pid}/environ")), PROC_TEXT_LIMIT).unwrap_or_default();
        let options = environ
            .split('\0')
            .filter_map(|v| v.strip_prefix("NODE_OPTIONS="))
            .flat_map(str::split_whitespace);
        let address = inspector_address(args.split('\0').chain(options));
        if let Some(host) = address.host.filter(|h| !loopback(h)) {
            bail!(
                "pid {pid}'s inspector would listen on {host}, beyond this machine's loopback, where others could take over the process: leakmon does not open it"
            );
        }
        if address.port == 0 {
            bail!(
                "pid {pid}'s inspector would listen on a port chosen when it opens, which leakmon cannot keep from other users beforehand: leakmon does not open it"
            );
        }
        // Before the port opens: from its first moment only root and the process's own
        // user may connect to it.
        let owner = Identity::of(proc_root, pid).with_context(|| format!("no process {pid}"))?;
        let port = PortGuard::hold(address.port, owner.uid)?;
        let mut guard = Guard::start(pid)?;
        guard.armed()?;
        process
            .signal(libc::SIGUSR1)
            .map_err(|e| anyhow::anyhow!("signal pid {pid} (SIGUSR1) to open its inspector: {e}"))?;
        let Some(addr) =
            wait_for(|| listening(pid).ok()?.into_iter().find(|a| !before.contains(a) && is_inspector(*a)))
        else {
            bail!(
                "pid {pid} opened no inspector within {OPEN_TIMEOUT:?} of SIGUSR1 (the program handles SIGUSR1 itself): nothing was changed"
            );
        };
        info!(pid, %addr, "inspector opened");
        // From here on the inspector is open: a failure closes it again (on drop).
        let mut node =
            Self { pid, addr, session: None, interval: 0, sampling: false, guard: Some(guard), _port: port };
        if addr.port() != address.port {
            bail!(
                "pid {pid}'s inspector opened on {addr}, not on the port its options name ({}), which leakmon kept from other users: closed again at once",
                address.port
            );
        }
        if let Some(bound) =
            listeners(pid)?.into_iter().find(|a| a.port() == addr.port() && !a.ip().is_loopback())
        {
            bail!("pid {pid}'s inspector opened on {bound}, beyond loopback: closed again at once");
        }
        let mut session = Session::open(addr)?;
        session.call("HeapProfiler.enable", &json!({}))?;
        node.session = Some(session);
        Ok(node)
    }

    /// Samples every allocation (collected ones too) at `start` for a second: their
    /// number, times `start`, is the allocation rate, and [`pace::interval`] the
    /// interval for it. Those samples are dropped: the window's begin after.
    fn pace(&mut self, start: u64) -> Result<u64> {
        let session = self.session()?;
        session.call(
            "HeapProfiler.startSampling",
            &json!({
                "samplingInterval": start,
                "includeObjectsCollectedByMajorGC": true,
                "includeObjectsCollectedByMinorGC": true,
            }),
        )?;
        std::thread::sleep(pace::MEASURED);
        let profile = session.call("HeapProfiler.getSamplingProfile", &json!({}));
        session.call("HeapProfiler.stopSampling", &json!({}))?;
        let samples = profile?["profile"]["samples"].as_array().map_or(0, Vec::len) as u64;
        Ok(pace::interval(start, samples, pace::MEASURED))
    }

    fn session(&mut self) -> Result<&mut Session> {
        self.session.as_mut().ok_or_else(|| anyhow::anyhow!("pid {}'s inspector session is closed", self.pid))
    }

    /// Stops sampling and closes the inspector.
    fn finish(&mut self) -> Result<()> {
        if self.guard.is_none() {
            // Closed already.
            return Ok(());
        }
        let Some(mut session) = self.session.take().map_or_else(|| Session::open(self.addr).ok(), Some)
        else {
            // No session to close it through: the guardian tries (on drop).
            return Ok(());
        };
        let stopped = if self.sampling {
            session.call("HeapProfiler.stopSampling", &json!({})).map(drop)
        } else {
            Ok(())
        };
        let _ = session.call("HeapProfiler.disable", &json!({}));
        // inspector.close() waits for every session to end: run it once this one has.
        // `require` is the console's, there only while the expression runs: take the
        // module now. Nothing here may throw in the program later.
        let _ =
            session.call("Runtime.evaluate", &json!({ "expression": CLOSE, "includeCommandLineAPI": true }));
        session.close();
        let guard = self.guard.take();
        if close(self.pid, self.addr) {
            if let Some(guard) = guard {
                guard.closed();
            }
        }
        // Else the guard is dropped: its guardian tries again.
        stopped
    }
}

impl Profiler for Node {
    fn snapshot(&mut self) -> Result<Vec<Stack>> {
        let profile = self.session()?.call("HeapProfiler.getSamplingProfile", &json!({}))?;
        Ok(stacks(&profile["profile"]))
    }

    fn close(mut self: Box<Self>) -> Result<()> {
        self.finish()
    }

    fn notes(&self, stacks: &[Stack]) -> Vec<String> {
        std::iter::once(notes::V8_INLINING.to_owned()).chain(notes::inlined_into_node(stacks)).collect()
    }

    fn interval(&self) -> Option<u64> {
        Some(self.interval)
    }
}

/// Node.js: its own JavaScript (`node:` URLs) is library code; found by its
/// executable's name; V8's sampling heap profiler, reached through the inspector in the
/// process's network namespace.
pub struct NodeSupport;

pub static NODE: NodeSupport = NodeSupport;

impl Support for NodeSupport {
    fn name(&self) -> &'static str {
        "node"
    }

    fn title(&self) -> &'static str {
        "Node.js"
    }

    fn library_code(&self, _function: &str, file: Option<&str>) -> bool {
        file.is_some_and(|f| f.starts_with("node:"))
    }

    fn runs(&self, exe: &str, _maps: &str) -> bool {
        exe == "node" || exe == "nodejs"
    }

    fn profiler(&self, pid: u32, options: Options) -> Option<Result<Box<dyn Profiler>>> {
        Some(Node::open(pid, options.interval).map(|n| Box::new(n) as Box<dyn Profiler>))
    }

    fn in_net_namespace(&self) -> bool {
        true
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Waits for the inspector at `addr` to close; says so if it stays open.
fn close(pid: u32, addr: SocketAddr) -> bool {
    if wait_for(|| (!listening(pid).ok()?.contains(&addr)).then_some(())).is_some() {
        info!(pid, "inspector closed");
        true
    } else {
        warn!(pid, %addr, "the inspector stayed open after sampling");
        false
    }
}

fn wait_for<T>(mut found: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    loop {
        if let Some(v) = found() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The stacks of a `SamplingHeapProfile`: a tree of call frames, each node with the
/// bytes its own live samples hold, and the samples naming their node.
pub fn stacks(profile: &Value) -> Vec<Stack> {
    let mut counts = std::collections::HashMap::new();
    for sample in profile["samples"].as_array().into_iter().flatten() {
        if let Some(node) = sample["nodeId"].as_u64() {
            *counts.entry(node).or_insert(0u64) += 1;
        }
    }
    let mut out = Vec::new();
    let mut path = Vec::new();
    walk(&profile["head"], &mut path, &counts, &mut out);
    out.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    out
}

fn walk(
    node: &Value,
    path: &mut Vec<Frame>,
    counts: &std::collections::HashMap<u64, u64>,
    out: &mut Vec<Stack>,
) {
    let frame = &node["callFrame"];
    let function = frame["functionName"].as_str().unwrap_or_default();
    // The tree's root stands for no code.
    let root = function == "(root)";
    if !root {
        path.push(Frame {
            function: if function.is_empty() { "(anonymous)".to_owned() } else { function.to_owned() },
            file: frame["url"].as_str().unwrap_or_default().to_owned(),
            line: frame["lineNumber"].as_i64().map_or(0, |l| (l + 1).max(0) as u32),
            column: frame["columnNumber"].as_i64().map_or(0, |c| (c + 1).max(0) as u32),
        });
    }
    let bytes = node["selfSize"].as_u64().unwrap_or(0);
    if bytes > 0 && !path.is_empty() {
        let samples = node["id"].as_u64().and_then(|id| counts.get(&id).copied()).unwrap_or(0);
        out.push(Stack { frames: path.iter().rev().cloned().collect(), bytes, samples });
    }
    for child in node["children"].as_array().into_iter().flatten() {
        walk(child, path, counts, out);
    }
    if !root {
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_tree_becomes_stacks_innermost_first() {
        let profile = json!({
            "head": {"callFrame": {"functionName": "(root)", "url": "", "lineNumber": -1, "columnNumber": -1},
                "selfSize": 0, "id": 1, "children": [
                {"callFrame": {"functionName": "", "url": "file:///srv/app.js", "lineNumber": 0, "columnNumber": 0},
                 "selfSize": 0, "id": 2, "children": [
                    {"callFrame": {"functionName": "remember", "url": "file:///srv/app.js", "lineNumber": 9, "columnNumber": 2},
                     "selfSize": 65536, "id": 3, "children": []}]}]},
            "samples": [{"size": 32768, "nodeId": 3, "ordinal": 1}, {"size": 32768, "nodeId": 3, "ordinal": 2}]
        });
        let stacks = stacks(&profile);
        assert_eq!(stacks.len(), 1);
        assert_eq!(stacks[0].bytes, 65536);
        assert_eq!(stacks[0].samples, 2);
        let names: Vec<(&str, u32)> =
            stacks[0].frames.iter().map(|f| (f.function.as_str(), f.line)).collect();
        assert_eq!(names, [("remember", 10), ("(anonymous)", 1)]);
    }
}
