//! The names of what a scan found, given once the process runs again: a global by its
//! symbol, a stack frame by its function, file and line, a chain by the allocation
//! sites of its blocks.

use std::path::Path;

use serde::Serialize;

use super::scan::{Outcome, RawHolder, Reachability, RootAt};
use crate::{procfs::Mapping, symbolize::Symbolizer};

/// Reachable bytes of a stack, the root that holds them and the allocation sites of
/// the blocks between the root and them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HolderReport {
    pub bytes: u64,
    pub root: RootReport,
    pub path: Vec<String>,
}

/// A root: `global` (`name`, the variable; `object`, the file it belongs to),
/// `stack` (`function`, `file`, `line` of the frame; `thread`), `tls` or `register`
/// (`name`, `thread`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RootReport {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread: Option<u32>,
}

impl RootReport {
    /// One line: "global list_head (fixture)", "stack of holder_thread (fixture.c:40)".
    pub fn describe(&self) -> String {
        fn file(f: &Option<String>) -> Option<&str> {
            Path::new(f.as_deref()?).file_name()?.to_str()
        }
        match self.kind {
            "global" => {
                let name = self.name.as_deref().unwrap_or("an unnamed global");
                match (file(&self.file), self.line, file(&self.object)) {
                    (Some(f), Some(l), _) => format!("global {name} ({f}:{l})"),
                    (_, _, Some(object)) => format!("global {name} ({object})"),
                    _ => format!("global {name}"),
                }
            }
            "stack" => {
                let function = self.function.as_deref().unwrap_or("an unnamed function");
                match (file(&self.file), self.line) {
                    (Some(f), Some(l)) => format!("the stack of {function} ({f}:{l})"),
                    _ => format!("the stack of {function}"),
                }
            }
            "tls" => format!("thread-local storage of thread {}", self.thread.unwrap_or(0)),
            _ => format!(
                "register {} of thread {}",
                self.name.as_deref().unwrap_or("?"),
                self.thread.unwrap_or(0)
            ),
        }
    }
}

/// Names for one process's scan: its mappings (file-backed) and root.
pub struct Namer<'a> {
    pub symbolizer: &'a Symbolizer,
    pub pid: u32,
    pub maps: &'a [Mapping],
    pub root: Option<&'a Path>,
}

impl Namer<'_> {
    fn root(&self, root: &RootAt) -> RootReport {
        match root {
            RootAt::Global { object, address } => {
                let variable = self.symbolizer.variable(self.maps, self.root, Path::new(object), *address);
                let (name, declared) = variable.map_or((None, None), |(n, d)| (Some(n), d));
                RootReport {
                    kind: "global",
                    name,
                    file: declared.as_ref().map(|d| d.file.clone()),
                    line: declared.map(|d| d.line),
                    object: Some(object.clone()),
                    ..RootReport::default()
                }
            }
            RootAt::Stack { tid, pc } => {
                let frame = self.symbolizer.frames(self.pid, self.maps, self.root, &[*pc]).into_iter().next();
                let frame = frame.unwrap_or_default();
                RootReport {
                    kind: "stack",
                    function: frame.function,
                    file: frame.file,
                    line: frame.line,
                    thread: Some(*tid),
                    ..RootReport::default()
                }
            }
            RootAt::Tls { tid } => RootReport { kind: "tls", thread: Some(*tid), ..RootReport::default() },
            RootAt::Register { tid, name } => RootReport {
                kind: "register",
                name: Some((*name).to_owned()),
                thread: Some(*tid),
                ..RootReport::default()
            },
        }
    }

    /// The holders of one stack, named, those that name alike merged, the largest
    /// [`super::scan::MAX_HOLDERS`]; `site` names a stack id by its allocation site.
    pub fn holders(&self, raw: &[RawHolder], site: &dyn Fn(u64) -> String) -> Vec<HolderReport> {
        let mut named: Vec<HolderReport> = Vec::new();
        for h in raw {
            let root = self.root(&h.root);
            let mut path: Vec<String> = Vec::with_capacity(h.path.len());
            for name in h.path.iter().map(|&id| site(id)) {
                if !path.contains(&name) {
                    path.push(name);
                }
            }
            match named.iter_mut().find(|n| n.root == root && n.path == path) {
                Some(n) => n.bytes += h.bytes,
                None => named.push(HolderReport { bytes: h.bytes, root, path }),
            }
        }
        named.sort_by_key(|n| std::cmp::Reverse(n.bytes));
        named.truncate(super::scan::MAX_HOLDERS);
        named
    }
}

/// A scan, as a process's report gives it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScanSummary {
    /// Whether every root and every block reached was read within the budget; when
    /// not, no stack is classified.
    pub complete: bool,
    pub threads: usize,
    /// Blocks leakmon saw allocated, and blocks between them taken from glibc's chunk
    /// headers.
    pub blocks: usize,
    pub unseen_blocks: usize,
    /// Sampled blocks left out: the allocator's header gave no size.
    #[serde(skip_serializing_if = "is_zero")]
    pub unsized_blocks: usize,
    pub scanned_bytes: u64,
    /// Bytes read per second of reading them (the pause less the stop), in GB/s.
    pub gb_per_second: f64,
    pub budget_ms: f64,
}

impl ScanSummary {
    pub fn of(outcome: &Outcome, budget_ms: f64) -> Self {
        let seconds = outcome.flood.as_secs_f64().max(1e-9);
        Self {
            complete: outcome.complete,
            threads: outcome.threads,
            blocks: outcome.blocks,
            unseen_blocks: outcome.unseen_blocks,
            unsized_blocks: outcome.no_size,
            scanned_bytes: outcome.scanned_bytes,
            gb_per_second: (outcome.scanned_bytes as f64 / seconds / 1e9 * 1000.0).round() / 1000.0,
            budget_ms,
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What a stack's report says of its blocks after a scan.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StackHeld {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reachability: Option<Reachability>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<HolderReport>,
}

impl StackHeld {
    /// The line under a stack in the table: "lost", "held by ...", or both.
    pub fn line(&self) -> Option<String> {
        let r = self.reachability?;
        let lost = r.lost();
        let mut parts = Vec::new();
        if lost > 0 {
            parts.push(format!("{} lost", crate::units::bytes(lost)));
        }
        if r.possibly_lost > 0 {
            parts.push(format!(
                "{} possibly lost (interior pointers only)",
                crate::units::bytes(r.possibly_lost)
            ));
        }
        if let Some(h) = self.holders.first() {
            let via =
                if h.path.is_empty() { String::new() } else { format!(" via {}", h.path.join(" → ")) };
            parts.push(format!("{} held by {}{via}", crate::units::bytes(r.reachable), h.root.describe()));
        } else if r.reachable > 0 {
            parts.push(format!("{} reachable", crate::units::bytes(r.reachable)));
        }
        Some(parts.join("; "))
    }
}

/// A scan of one process, and what naming its findings needs.
pub struct Scanned {
    /// What it found, or why there was no scan (one line, for the process's notes).
    pub outcome: Result<Outcome, String>,
    pub budget_ms: f64,
    /// Its mappings and root (as captured for its report).
    pub info: crate::report::ProcessInfo,
}

/// Puts a scan of process `pid` into `report`: the pause and coverage on the process,
/// the classes and named holders on each stack. `stack` gives a stack id's addresses,
/// for the sites along a chain.
pub fn attach(
    report: &mut crate::report::Report,
    pid: u32,
    scanned: &Scanned,
    symbolizer: &Symbolizer,
    stack: &dyn Fn(u64) -> Option<Vec<u64>>,
) {
    let Some(process) = report.processes.iter_mut().find(|p| p.pid == pid) else { return };
    let outcome = match &scanned.outcome {
        Ok(outcome) => outcome,
        Err(why) => {
            process.notes.push(format!("No holders scan: {why}"));
            return;
        }
    };
    process.pause_ms = Some((outcome.pause.as_secs_f64() * 1e6).round() / 1e3);
    process.holders_scan = Some(ScanSummary::of(outcome, scanned.budget_ms));
    if !outcome.complete {
        process.notes.push(format!(
            "The holders scan ran out of its {} ms budget (or found more than {} blocks in glibc's heap to follow) after reading {} of memory and let the process go: nothing is classified (a larger --holders-budget covers a larger heap)",
            scanned.budget_ms,
            super::chunks::MAX_BLOCKS,
            crate::units::bytes(outcome.scanned_bytes)
        ));
        return;
    }
    if outcome.unbounded {
        process.notes.push(format!(
            "Blocks allocated before the window are unknown to leakmon, and {}'s own records of them are not read yet: a block held only through one counts as lost",
            scanned.info.allocator.map_or("this allocator", |a| a.name())
        ));
    }
    if outcome.at_exit {
        process.notes.push(
            "Scanned at its exit: only the exiting thread's stack and registers were roots (other threads had ended), so blocks only they held count as lost; --pid scans it running".to_owned(),
        );
    }
    let namer = Namer { symbolizer, pid, maps: &scanned.info.maps, root: scanned.info.root.as_deref() };
    let known: std::collections::HashMap<u64, String> = process
        .stacks
        .iter()
        .map(|s| (s.key, s.site.as_ref().map_or_else(|| "?".into(), |f| f.function.clone())))
        .collect();
    let site = |id: u64| -> String {
        if id == super::scan::UNSEEN {
            return "(a block not seen allocated)".to_owned();
        }
        if let Some(name) = known.get(&id) {
            return name.clone();
        }
        let frames =
            stack(id).map(|ips| symbolizer.frames(pid, namer.maps, namer.root, &ips)).unwrap_or_default();
        frames.get(symbolizer.site(&frames)).and_then(|f| f.function.clone()).unwrap_or_else(|| "?".into())
    };
    for s in &mut process.stacks {
        let Some(found) = outcome.stacks.get(&s.key) else { continue };
        s.held.reachability = Some(found.reachability);
        s.held.holders = namer.holders(&found.holders, &site);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(reachability: Reachability, holders: Vec<HolderReport>) -> StackHeld {
        StackHeld { reachability: Some(reachability), holders }
    }

    /// The line under a stack says what is lost and who holds the rest, in words.
    #[test]
    fn the_table_line_says_lost_or_held_by_whom() {
        let lost = Reachability { definitely_lost: 1000, indirectly_lost: 24, ..Reachability::default() };
        assert_eq!(held(lost, vec![]).line().as_deref(), Some("1.0 KiB (1024 B) lost"));
        let root = RootReport {
            kind: "global",
            name: Some("cache".into()),
            file: Some("/src/app.c".into()),
            line: Some(12),
            object: Some("/usr/bin/app".into()),
            ..RootReport::default()
        };
        let holder = HolderReport { bytes: 4096, root, path: vec!["table_grow".into(), "entry_new".into()] };
        let reachable = Reachability { reachable: 4096, possibly_lost: 64, ..Reachability::default() };
        assert_eq!(
            held(reachable, vec![holder]).line().as_deref(),
            Some("64 B possibly lost (interior pointers only); 4.0 KiB (4096 B) held by global cache (app.c:12) via table_grow → entry_new")
        );
        let stack = RootReport {
            kind: "stack",
            function: Some("worker".into()),
            thread: Some(7),
            ..RootReport::default()
        };
        assert_eq!(stack.describe(), "the stack of worker");
        let register = RootReport {
            kind: "register",
            name: Some("rbx".into()),
            thread: Some(7),
            ..RootReport::default()
        };
        assert_eq!(register.describe(), "register rbx of thread 7");
        assert_eq!(StackHeld::default().line(), None, "no scan, no line");
    }
}
