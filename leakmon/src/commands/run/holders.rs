//! Holders scans the daemon runs on demand (`POST /api/v1/holders?pid=N`): the blocks
//! are read from the kernel's tables in the loop, the scan and its naming run on the
//! profile renderer's thread, and each process's last classes are kept for the
//! metrics, so that an alert can tell a forgotten free (lost) from a growing cache
//! (reachable).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::StatusCode;

use crate::{
    export::http::ProfileError,
    holders::{
        names::{attach, Scanned},
        scan::{known_blocks, scan, Hold, Known, Plan, Reachability},
    },
    probes::{targets::Allocator, Probes},
    procfs::ProcRoot,
    report::{ProcessInfo, Report},
    symbolize::Symbolizer,
};

/// Runs a runtime's holders window (a Node.js process's heap snapshots at its start
/// and end through its inspector; a JVM's JFR samples with their paths from GC roots)
/// on a thread of its own, and sends its report through `reply`: the window lasts
/// seconds, and neither the loop nor the profile renderer may wait for it.
pub fn run_runtime(
    pid: u32,
    runtime: crate::runtimes::Runtime,
    budget_ms: Option<u32>,
    window_s: u32,
    reply: super::profiles::Reply,
) {
    let spawned = std::thread::Builder::new().name("runtime-holders".into()).spawn(move || {
        let budget = Duration::from_millis(u64::from(budget_ms.unwrap_or(crate::holders::RUNTIME_BUDGET_MS)));
        let window = Duration::from_secs(u64::from(window_s));
        let found = match runtime {
            crate::runtimes::Runtime::Node => {
                crate::runtimes::node::holders::holders(pid, window, budget, &|| false)
            }
            crate::runtimes::Runtime::Jvm => crate::runtimes::jvm::holders(pid, window, budget, &|| false),
        };
        let answer = found
            .map(|found| {
                (crate::report::runtime::holders_report(pid, runtime.name(), found).to_json() + "\n")
                    .into_bytes()
            })
            .map_err(|e| (StatusCode::CONFLICT, format!("{e:#}")));
        let _ = reply.send(answer);
    });
    if let Err(e) = spawned {
        tracing::warn!(pid, "start a holders window: {e}");
    }
}

/// Each scanned process's last classes, per stack (its stable id).
pub type LastScans = Arc<Mutex<HashMap<u32, HashMap<String, Reachability>>>>;

/// A scan asked for, with what the loop read for it.
pub struct Ask {
    pid: u32,
    known: Vec<Known>,
    info: ProcessInfo,
    plan: Plan,
    budget_ms: u32,
    /// The addresses of the blocks' stacks, for the sites along a chain.
    stacks: HashMap<u64, Vec<u64>>,
    /// It runs CPython: what holds its objects is walked instead.
    python: bool,
}

/// What the loop reads for a scan of `pid`: its blocks and mappings; refuses in one
/// line what cannot be scanned.
pub fn ask(
    probes: &Probes,
    proc_root: &ProcRoot,
    info: ProcessInfo,
    pid: u32,
    budget_ms: u32,
) -> Result<Ask, ProfileError> {
    crate::holders::stop::refuse_traced(proc_root, pid)
        .map_err(|e| (StatusCode::CONFLICT, format!("{e:#}")))?;
    let known = known_blocks(probes, pid, crate::monotonic_ms(), true).map_err(|e| {
        (StatusCode::INTERNAL_SERVER_ERROR, format!("read the live blocks of pid {pid}: {e}"))
    })?;
    let glibc = info.allocator == Some(Allocator::Glibc);
    let python = crate::runtimes::python::runs(&info.maps);
    if !glibc && !python && known.iter().any(|k| k.size.is_none()) {
        let allocator = info.allocator.map_or("an unknown allocator", |a| a.name());
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("pid {pid} is sampled: its blocks are sized, and those between them found, from glibc malloc's chunk headers, not supported yet for {allocator}"),
        ));
    }
    let plan = Plan {
        hold: Hold::Stop,
        budget: Duration::from_millis(u64::from(budget_ms)),
        glibc_chunks: glibc,
        window: true,
    };
    let mut stacks = HashMap::new();
    for k in &known {
        if let std::collections::hash_map::Entry::Vacant(e) = stacks.entry(k.stack_id) {
            if let Some(ips) = probes.stack(k.stack_id) {
                e.insert(ips);
            }
        }
    }
    Ok(Ask { pid, known, info, plan, budget_ms, stacks, python })
}

impl Ask {
    /// Scans, and puts what it found into `report` (the process's, symbolized) and
    /// into `last`.
    pub fn run(
        self,
        mut report: Report,
        symbolizer: &Symbolizer,
        last: &LastScans,
    ) -> Result<Report, ProfileError> {
        let Self { pid, known, info, plan, budget_ms, stacks, python } = self;
        if python {
            return python_holders(report, pid, &known, &info, plan.budget);
        }
        let outcome = scan(&ProcRoot::default(), pid, plan, known)
            .map_err(|e| (StatusCode::CONFLICT, format!("holders scan of pid {pid}: {e:#}")))?;
        let scanned = Scanned { outcome: Ok(outcome), budget_ms: f64::from(budget_ms), info };
        attach(&mut report, pid, &scanned, symbolizer, &|id| stacks.get(&id).cloned());
        let classes: HashMap<String, Reachability> = report
            .processes
            .iter()
            .filter(|p| p.pid == pid)
            .flat_map(|p| &p.stacks)
            .filter_map(|s| Some((s.id.clone(), s.held.reachability?)))
            .collect();
        let mut last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if classes.is_empty() {
            last.remove(&pid);
        } else {
            last.insert(pid, classes);
        }
        Ok(report)
    }
}

/// What holds the objects of CPython process `pid` (its blocks `known`), put into
/// `report`: walked from its globals and frames, every thread held still.
fn python_holders(
    mut report: Report,
    pid: u32,
    known: &[Known],
    info: &ProcessInfo,
    budget: Duration,
) -> Result<Report, ProfileError> {
    let proc_root = ProcRoot::default();
    let root = info.root.clone().unwrap_or_else(|| proc_root.in_root(pid, std::path::Path::new("/")));
    let py = crate::runtimes::python::holders::interpreter(pid, &info.maps, &root)
        .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")))?;
    let found = crate::runtimes::python::holders::holders(&proc_root, pid, &py, known, budget, true)
        .map_err(|e| (StatusCode::CONFLICT, format!("what holds the objects of pid {pid}: {e:#}")))?;
    if let Some(p) = report.processes.iter_mut().find(|p| p.pid == pid) {
        p.set_holders(found);
    }
    Ok(report)
}
