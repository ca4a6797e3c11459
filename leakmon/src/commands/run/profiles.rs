//! Profiles served over HTTP: the kernel tables and /proc are read in the daemon's
//! loop (a snapshot); symbolizing and rendering, the slow part, run on a thread of
//! their own, so the loop keeps sampling.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use leakmon_common::ProcState;

use crate::{
    discovery::Discovery,
    export::http::{self, ProfileKind, ProfileRequest, Selector},
    monitor::Monitor,
    probes::Probes,
    report::{flamegraph, pprof},
    symbolize::Symbolizer,
    wrappers::Wrappers,
};

/// What a profile is made of, read from the kernel tables and /proc in the loop;
/// [`ProfileSnapshot::render`] does the rest elsewhere.
pub(super) struct ProfileSnapshot {
    snapshot: crate::commands::Snapshot,
    kind: ProfileKind,
    title: String,
    /// A holders scan to run first.
    holders: Option<super::holders::Ask>,
}

impl ProfileSnapshot {
    fn render(
        self,
        symbolizer: &Symbolizer,
        suppressions: &crate::suppressions::Suppressions,
        last: &super::holders::LastScans,
    ) -> Result<Vec<u8>, http::ProfileError> {
        use axum::http::StatusCode;
        let mut report = self.snapshot.into_report(symbolizer);
        report.set_apart(suppressions);
        if let Some(ask) = self.holders {
            report = ask.run(report, symbolizer, last)?;
        }
        match self.kind {
            ProfileKind::Holders { .. } => Ok((report.to_json() + "\n").into_bytes()),
            ProfileKind::Pprof => Ok(pprof::encode(&pprof::profile(&report, crate::unix_nanos()))),
            ProfileKind::FlameGraph => flamegraph::render(&report, &self.title)
                .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("draw the flame graph: {e}"))),
        }
    }
}

pub(super) type Reply = tokio::sync::oneshot::Sender<Result<Vec<u8>, http::ProfileError>>;

/// A thread that symbolizes and renders profile snapshots, one after another, with a
/// symbolizer of its own (blazesym's stays on the thread that made it).
pub(super) fn spawn_profile_renderer(
    wrappers: &[String],
    suppress: &[String],
    last: super::holders::LastScans,
) -> Result<std::sync::mpsc::Sender<(ProfileSnapshot, Reply)>> {
    let (tx, rx) = std::sync::mpsc::channel::<(ProfileSnapshot, Reply)>();
    let (wrappers, suppress) = (wrappers.to_vec(), suppress.to_vec());
    std::thread::Builder::new()
        .name("profiles".into())
        .spawn(move || {
            let symbolizer = Symbolizer::new(Wrappers::new(&wrappers));
            let suppressions = crate::suppressions::Suppressions::new(&suppress);
            answer_each(rx, |snapshot: ProfileSnapshot| snapshot.render(&symbolizer, &suppressions, &last));
        })
        .context("start the profile renderer")?;
    Ok(tx)
}

/// Answers each request with `render`'s result; one that panics (a file the target
/// changed under the symbolizer, a bug) is answered with an error, and the next is
/// rendered as usual: a panic must not leave every later profile broken.
fn answer_each<T>(
    requests: std::sync::mpsc::Receiver<(T, Reply)>,
    render: impl Fn(T) -> Result<Vec<u8>, http::ProfileError>,
) {
    for (request, reply) in requests {
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| render(request)))
            .unwrap_or_else(|_| {
                tracing::error!("rendering a profile panicked; the next is rendered anew");
                Err((
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "rendering the profile failed".to_owned(),
                ))
            });
        let _ = reply.send(answer);
    }
}

/// The snapshot of a profile of the unfreed memory of the processes `request` selects.
pub(super) fn profile_snapshot(
    probes: Option<&Probes>,
    discovery: &mut Discovery,
    monitor: &Monitor,
    request: &ProfileRequest,
    rate: u64,
) -> Result<ProfileSnapshot, http::ProfileError> {
    use axum::http::StatusCode;
    let Some(probes) = probes else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "allocation attribution is off (--attach none): there is no heap to profile".to_owned(),
        ));
    };
    let traced: HashMap<u32, ProcState> = probes
        .traced()
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("read the traced processes: {e}")))?
        .into_iter()
        .collect();
    let (pids, title): (Vec<u32>, String) = match &request.selector {
        Selector::Pid(pid) => (vec![*pid], format!("Unfreed memory of pid {pid}")),
        Selector::Service(service) => {
            (monitor.pids_of_service(service), format!("Unfreed memory of {service}"))
        }
    };
    let pids: Vec<u32> = pids.into_iter().filter(|p| traced.contains_key(p)).collect();
    if pids.is_empty() {
        let what = match &request.selector {
            Selector::Pid(pid) => format!("pid {pid} is not traced"),
            Selector::Service(service) => format!("no traced process of service {service:?}"),
        };
        return Err((StatusCode::NOT_FOUND, what));
    }
    let selected: HashMap<u32, ProcState> = pids.iter().map(|p| (*p, traced[p])).collect();
    let holders = match (request.kind, &request.selector) {
        (ProfileKind::Holders { budget_ms, .. }, Selector::Pid(pid)) => {
            let info = crate::commands::capture(discovery, *pid, true);
            // A CPython process's objects are walked (see runtimes::python::holders),
            // held longer than a native heap's flood.
            let default = if crate::runtimes::python::runs(&info.maps) {
                crate::holders::RUNTIME_BUDGET_MS
            } else {
                crate::holders::NATIVE_BUDGET_MS
            };
            let budget_ms = budget_ms.unwrap_or(default);
            Some(super::holders::ask(probes, discovery.proc_root(), info, *pid, budget_ms)?)
        }
        (ProfileKind::Holders { .. }, Selector::Service(_)) => {
            return Err((
                StatusCode::BAD_REQUEST,
                "a holders scan is of one process: give ?pid=N".to_owned(),
            ));
        }
        _ => None,
    };
    let snapshot = crate::commands::Snapshot::take(
        probes,
        discovery,
        &selected,
        HashMap::new(),
        rate,
        crate::monotonic_ms(),
    )
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    Ok(ProfileSnapshot { snapshot, kind: request.kind, title, holders })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_render_that_panics_leaves_the_next_one_served() {
        let (tx, rx) = std::sync::mpsc::channel::<(u32, Reply)>();
        let worker = std::thread::spawn(move || {
            answer_each(rx, |n| if n == 1 { panic!("a bad profile") } else { Ok(vec![n as u8]) });
        });
        let ask = |n: u32| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send((n, reply)).expect("the renderer is there");
            answer.blocking_recv().expect("an answer")
        };
        assert_eq!(ask(1).unwrap_err().0, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(ask(2).expect("rendered"), vec![2]);
        drop(tx);
        worker.join().expect("the renderer ends when asked no more");
    }
}
