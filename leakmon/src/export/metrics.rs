//! The Prometheus metric families, filled from the series views each tick.
//!
//! Labels: `service` and `comm` (never the pid or command line: unbounded, and command
//! lines hold secrets); `signal` = anon|shmem|heap; `stack`, a short stable hash, for the top
//! stacks only.

use prometheus::{
    core::Collector, Encoder as _, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::model::SeriesView;
use crate::probes::Counters;

/// Every family leakmon exports.
pub struct Metrics {
    registry: Registry,
    rss: IntGaugeVec,
    anon: IntGaugeVec,
    swap: IntGaugeVec,
    file: IntGaugeVec,
    shmem: IntGaugeVec,
    heap_bytes: IntGaugeVec,
    heap_incomplete: IntGaugeVec,
    heap_allocs: IntGaugeVec,
    growth: GaugeVec,
    suspected: IntGaugeVec,
    tte: GaugeVec,
    limit: IntGaugeVec,
    stack_bytes: IntGaugeVec,
    stack_blocks: IntGaugeVec,
    sample_bytes: IntGauge,
    stack_info: IntGaugeVec,
    stack_growth: GaugeVec,
    stack_suspected: IntGaugeVec,
    stack_lost: IntGaugeVec,
    stack_reachable: IntGaugeVec,
    allocator: IntGaugeVec,
    container: IntGaugeVec,
    events_lost: IntCounterVec,
    map_errors: IntCounterVec,
    attached: IntGauge,
    unwind_rows: IntGaugeVec,
    unwind_processes: IntGauge,
    own_heap: IntGauge,
    queued: IntGauge,
    series_dropped: IntCounter,
    errors: IntCounterVec,
    oom_kills: IntCounterVec,
    restarts: IntCounterVec,
    last_restarts: std::collections::HashMap<(String, String, Option<u32>), u64>,
    pid_label: bool,
    last_counters: Counters,
    last_dropped: u64,
}

/// The `map` label values of `leakmon_bpf_map_errors_total`.
const MAP_LABELS: [&str; 5] = ["live", "totals", "stacks", "inflight", "procs"];

/// The `service`, `comm` and, with `pid_label`, `pid` label values of a group's series.
fn group_labels(pid_label: bool, service: &str, comm: &str, pid: Option<u32>) -> Vec<String> {
    let mut labels = vec![service.to_owned(), comm.to_owned()];
    if pid_label {
        labels.push(pid.map(|p| p.to_string()).unwrap_or_default());
    }
    labels
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Metrics {
    /// The unwind tables' fill: rows used and allocated, processes with tables.
    /// The sampling interval the heap figures are taken at (0: exact).
    pub fn sampling(&self, sample_bytes: u64) {
        self.sample_bytes.set(i64::try_from(sample_bytes).unwrap_or(i64::MAX));
    }

    pub fn unwind(&self, rows_used: u32, rows_capacity: u32, processes: usize) {
        self.unwind_rows.with_label_values(&["used"]).set(i64::from(rows_used));
        self.unwind_rows.with_label_values(&["capacity"]).set(i64::from(rows_capacity));
        self.unwind_processes.set(processes as i64);
    }

    /// leakmon's own heap in use, when its C library can say.
    pub fn own_heap(&self, bytes: Option<u64>) {
        if let Some(bytes) = bytes {
            self.own_heap.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// `pid_label`: per-process series carry a `pid` label (off by default: pids are
    /// unbounded over time and split a service's history at every restart).
    pub fn new(pid_label: bool) -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let fgauge = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, GaugeVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let single = |name: &str, help: &str| register(&registry, IntGauge::new(name, help).expect("valid"));
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let sc: &[&str] = if pid_label { &["service", "comm", "pid"] } else { &["service", "comm"] };
        let scs: &[&str] =
            if pid_label { &["service", "comm", "pid", "signal"] } else { &["service", "comm", "signal"] };
        let scst: &[&str] =
            if pid_label { &["service", "comm", "pid", "stack"] } else { &["service", "comm", "stack"] };
        let m = Self {
            rss: gauge("leakmon_memory_rss_bytes", "Resident memory (VmRSS, file-backed pages included) of the processes of a service and command.", sc),
            anon: gauge("leakmon_memory_anon_bytes", "Anonymous resident memory (RssAnon); with swap, the signal judged for leaks.", sc),
            swap: gauge("leakmon_memory_swap_bytes", "Anonymous memory swapped out (VmSwap).", sc),
            file: gauge("leakmon_memory_file_bytes", "File-backed resident pages (RssFile): cache the kernel can drop, never judged as a leak.", sc),
            shmem: gauge("leakmon_memory_shmem_bytes", "Resident shared memory (RssShmem), judged as a signal of its own.", sc),
            heap_bytes: gauge("leakmon_heap_live_bytes", "Bytes allocated and not freed (allocator probes).", sc),
            heap_incomplete: gauge(
                "leakmon_heap_incomplete",
                "1 when some allocations of a service and command could not be counted (a kernel table was full): its heap figures are lower bounds and its heap verdict is withheld.",
                sc,
            ),
            heap_allocs: gauge("leakmon_heap_live_allocations", "Allocations not freed (allocator probes).", sc),
            growth: fgauge("leakmon_growth_bytes_per_second", "Robust (Theil-Sen) growth rate over the analysis window.", scs),
            suspected: gauge("leakmon_leak_suspected", "1 while growth is steady and significant over the window.", scs),
            tte: fgauge("leakmon_time_to_exhaustion_seconds", "Seconds until the memory limit at the current growth rate.", scs),
            limit: gauge("leakmon_memory_limit_bytes", "The limit used for time to exhaustion: cgroup memory.max, else host memory.", sc),
            stack_bytes: gauge("leakmon_stack_live_bytes", "Unfreed bytes of one of the top allocation stacks.", scst),
            stack_blocks: gauge(
                "leakmon_stack_live_blocks",
                "Blocks behind leakmon_stack_live_bytes: the sampled blocks when sampling (leakmon_sample_bytes > 0; a figure from n of them is within about ±1.645/sqrt(n) of the truth, 90%, for blocks much smaller than the interval), every unfreed block when exact.",
                scst,
            ),
            stack_info: gauge("leakmon_stack_info", "Allocation site of a stack hash; always 1.", &["stack", "function", "location"]),
            stack_growth: fgauge("leakmon_stack_growth_bytes_per_second", "Robust (Theil-Sen) growth rate of one top stack's unfreed bytes over the window.", scst),
            stack_suspected: gauge("leakmon_stack_leak_suspected", "1 while one top stack's unfreed bytes grow steadily and significantly.", scst),
            stack_lost: gauge(
                "leakmon_stack_lost_bytes",
                "Unfreed bytes of one of the top stacks that nothing in the process points at any more (definitely or indirectly lost, as valgrind memcheck says), at the last holders scan (POST /api/v1/holders): a forgotten free.",
                scst,
            ),
            stack_reachable: gauge(
                "leakmon_stack_reachable_bytes",
                "Unfreed bytes of one of the top stacks still held from a global, a stack, TLS or a register, at the last holders scan: a growing cache or collection, not a forgotten free.",
                scst,
            ),
            container: gauge(
                "leakmon_container_info",
                "The container a service and command's processes run in, from their cgroup path: its runtime (podman, docker, containerd, cri-o, kubernetes), id and Kubernetes pod UID (empty outside a pod); always 1.",
                &[sc, &["runtime", "container", "pod_uid"]].concat(),
            ),
            allocator: gauge(
                "leakmon_allocator_info",
                "The allocator (glibc, musl, jemalloc, tcmalloc, mimalloc, other) that a service and command's malloc calls reach; always 1.",
                &[sc, &["allocator"]].concat(),
            ),
            events_lost: counter("leakmon_events_lost_total", "Kernel events leakmon could not receive.", &["source"]),
            map_errors: counter(
                "leakmon_bpf_map_errors_total",
                "Allocations not fully accounted because a kernel table was full or a stack was lost.",
                &["map"],
            ),
            attached: single("leakmon_attached_processes", "Processes traced by the allocator probes."),
            unwind_rows: gauge(
                "leakmon_unwind_rows",
                "Unwind-table rows in the kernel (12 bytes each): used, and the capacity allocated at start.",
                &["state"],
            ),
            unwind_processes: single("leakmon_unwind_processes", "Traced processes whose stacks are walked through unwind tables."),
            sample_bytes: single(
                "leakmon_sample_bytes",
                "The byte-weighted sampling interval of the heap and stack figures (one sampled block per this many bytes allocated, on average); 0 when they are exact. With the agent and no --sample-bytes, the interval each process starts at: its agent then paces it to the process's allocation rate, and each block keeps the interval it was sampled at.",
            ),
            queued: single(
                "leakmon_lifecycle_events_queued",
                "Fork, exec and exit events received and not yet handled: a backlog that keeps growing means the daemon cannot keep up with process churn.",
            ),
            own_heap: single(
                "leakmon_self_heap_bytes",
                "leakmon's own heap in use (allocated and not freed), beside process_resident_memory_bytes, which also counts freed memory kept by the allocator and mapped files.",
            ),
            series_dropped: register(
                &registry,
                IntCounter::new("leakmon_series_dropped_total", "New series turned away by the series cap.").expect("valid"),
            ),
            errors: counter(
                "leakmon_errors_total",
                "Operations of the daemon that failed and were left for their next turn (a purge of exited processes' kernel state, a profile).",
                &["operation"],
            ),
            oom_kills: counter("leakmon_oom_kills_total", "Processes of a service and command killed by the OOM killer.", sc),
            restarts: counter(
                "leakmon_restarts_total",
                "Times every process of a service and command was replaced by new ones.",
                sc,
            ),
            last_restarts: std::collections::HashMap::new(),
            pid_label,
            last_counters: Counters::default(),
            last_dropped: 0,
            registry,
        };
        m.present_from_the_start();
        m
    }

    /// leakmon's build, its own process's families, and the counters whose labels are
    /// known at zero: `increase()` sees their first loss, and dashboards and alerts find
    /// the series before anything went wrong.
    fn present_from_the_start(&self) {
        let build = register(
            &self.registry,
            IntGaugeVec::new(Opts::new("leakmon_build_info", "leakmon's version; always 1."), &["version"])
                .expect("valid"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // Counters with known labels start at 0, so `increase()` sees their first loss
        // and dashboards and alerts find the series before anything went wrong.
        for source in ["lifecycle_ring", "lifecycle_queue", "lifecycle_malformed"] {
            self.events_lost.with_label_values(&[source]);
        }
        for map in MAP_LABELS {
            self.map_errors.with_label_values(&[map]);
        }
        #[cfg(target_os = "linux")]
        self.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("process collector");
        // Present from the start, so a rate over it works before the first failure.
        self.errors.with_label_values(&["purge"]);
    }

    /// Replaces every per-series value with those of `views`.
    pub fn update(
        &mut self,
        views: &[SeriesView],
        counters: Option<Counters>,
        attached: usize,
        dropped: u64,
    ) {
        use leakmon_common::counter as k;
        for g in [
            &self.rss,
            &self.anon,
            &self.swap,
            &self.file,
            &self.shmem,
            &self.heap_bytes,
            &self.heap_incomplete,
            &self.heap_allocs,
            &self.limit,
            &self.suspected,
            &self.stack_bytes,
            &self.stack_blocks,
            &self.stack_info,
            &self.stack_suspected,
            &self.allocator,
            &self.container,
        ] {
            g.reset();
        }
        self.growth.reset();
        self.stack_growth.reset();
        self.tte.reset();
        for v in views {
            let pid = v.pid.map(|p| p.to_string()).unwrap_or_default();
            let mut sc = vec![v.service.as_str(), v.comm.as_str()];
            if self.pid_label {
                sc.push(pid.as_str());
            }
            let scs = [sc.as_slice(), &[v.signal]].concat();
            let bytes = i64::try_from(v.current_bytes).unwrap_or(i64::MAX);
            if let Some(c) = v.container.as_ref().filter(|_| v.signal == "anon") {
                let pod = c.pod_uid.as_deref().unwrap_or("");
                self.container
                    .with_label_values(&[sc.as_slice(), &[c.runtime, c.id.as_str(), pod]].concat())
                    .set(1);
            }
            if let Some(allocator) = v.allocator.filter(|_| v.signal == "anon") {
                self.allocator.with_label_values(&[sc.as_slice(), &[allocator]].concat()).set(1);
            }
            let gauge_bytes = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
            if v.signal == "anon" {
                let m = v.memory.unwrap_or_default();
                self.rss.with_label_values(&sc).set(gauge_bytes(m.rss));
                self.anon.with_label_values(&sc).set(gauge_bytes(m.anon));
                self.swap.with_label_values(&sc).set(gauge_bytes(m.swap));
                self.file.with_label_values(&sc).set(gauge_bytes(m.file));
                self.shmem.with_label_values(&sc).set(gauge_bytes(m.shmem));
                if let Some(limit) = v.limit_bytes {
                    self.limit.with_label_values(&sc).set(gauge_bytes(limit));
                }
            } else if v.signal == "heap" {
                self.heap_bytes.with_label_values(&sc).set(bytes);
                self.heap_incomplete.with_label_values(&sc).set(i64::from(v.incomplete));
                self.heap_allocs.with_label_values(&sc).set(v.allocations.unwrap_or(0) as i64);
            }
            self.growth.with_label_values(&scs).set(v.growth_bytes_per_second);
            self.suspected.with_label_values(&scs).set(i64::from(v.suspected));
            if let Some(t) = v.time_to_exhaustion_seconds {
                self.tte.with_label_values(&scs).set(t);
            }
            for s in &v.stacks {
                let labels = [sc.as_slice(), &[s.stack.as_str()]].concat();
                self.stack_bytes.with_label_values(&labels).set(s.bytes as i64);
                self.stack_blocks.with_label_values(&labels).set(s.allocations as i64);
                self.stack_info
                    .with_label_values(&[s.stack.as_str(), s.function.as_str(), s.location.as_str()])
                    .set(1);
                if let Some(t) = s.trend {
                    self.stack_growth.with_label_values(&labels).set(t.growth_bytes_per_second);
                    self.stack_suspected.with_label_values(&labels).set(i64::from(t.suspected));
                }
            }
        }
        if let Some(c) = counters {
            let delta = |i: u32| c.0[i as usize].saturating_sub(self.last_counters.0[i as usize]);
            self.events_lost.with_label_values(&["lifecycle_ring"]).inc_by(delta(k::EVENTS_LOST));
            for (map, idx) in [
                ("live", k::LIVE_FULL),
                ("totals", k::TOTALS_FULL),
                ("stacks", k::STACKS_FULL),
                ("stacks", k::STACK_ERROR),
                ("inflight", k::INFLIGHT_FULL),
                ("procs", k::PROC_FULL),
            ] {
                self.map_errors.with_label_values(&[map]).inc_by(delta(idx));
            }
            self.last_counters = c;
        }
        self.attached.set(attached as i64);
        self.series_dropped.inc_by(dropped.saturating_sub(self.last_dropped));
        self.last_dropped = dropped;
    }

    /// The classes of each process's last holders scan (`last`, by pid and stable stack
    /// id) on the top stacks of `views`.
    pub fn holders(
        &self,
        views: &[SeriesView],
        last: &std::collections::HashMap<
            u32,
            std::collections::HashMap<String, crate::holders::scan::Reachability>,
        >,
    ) {
        self.stack_lost.reset();
        self.stack_reachable.reset();
        for v in views.iter().filter(|v| v.signal == "heap") {
            let pid = v.pid.map(|p| p.to_string()).unwrap_or_default();
            let mut sc = vec![v.service.as_str(), v.comm.as_str()];
            if self.pid_label {
                sc.push(pid.as_str());
            }
            let scans: Vec<_> = v.pids.iter().filter_map(|p| last.get(p)).collect();
            for s in &v.stacks {
                let classes = scans.iter().filter_map(|scan| scan.get(&s.stack));
                let (lost, reachable) =
                    classes.fold((0u64, 0u64), |(l, r), c| (l + c.lost(), r + c.reachable));
                if scans.iter().any(|scan| scan.contains_key(&s.stack)) {
                    let labels = [sc.as_slice(), &[s.stack.as_str()]].concat();
                    self.stack_lost.with_label_values(&labels).set(i64::try_from(lost).unwrap_or(i64::MAX));
                    self.stack_reachable
                        .with_label_values(&labels)
                        .set(i64::try_from(reachable).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// One failed operation of the daemon, which goes on.
    pub fn error(&self, operation: &str) {
        self.errors.with_label_values(&[operation]).inc();
    }

    /// Lifecycle events waiting to be handled.
    pub fn queued(&self, events: usize) {
        self.queued.set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// Events lost in userspace: the queue behind the ring reader was full, or a
    /// record had the wrong size. Both totals since start.
    pub fn queue_losses(&mut self, dropped: u64, malformed: u64) {
        let queue = self.events_lost.with_label_values(&["lifecycle_queue"]);
        queue.inc_by(dropped.saturating_sub(queue.get()));
        let bad = self.events_lost.with_label_values(&["lifecycle_malformed"]);
        bad.inc_by(malformed.saturating_sub(bad.get()));
    }

    /// Counts one OOM kill.
    pub fn oom_kill(&self, service: &str, comm: &str, pid: u32) {
        self.oom_kills.with_label_values(&group_labels(self.pid_label, service, comm, Some(pid))).inc();
    }

    /// Brings the restart counters up to the monitor's totals. A group the monitor has
    /// forgotten (gone for a whole window) loses its counter, so groups that came and
    /// went do not pile up for the daemon's lifetime; if it comes back, its counter
    /// starts again, which Prometheus reads as a counter reset.
    pub fn restarts<'a>(&mut self, totals: impl Iterator<Item = (&'a (String, String, Option<u32>), u64)>) {
        let pid_label = self.pid_label;
        let labels_of = |key: &(String, String, Option<u32>)| group_labels(pid_label, &key.0, &key.1, key.2);
        let mut current = std::collections::HashSet::new();
        for (key, n) in totals {
            current.insert(key);
            let last = self.last_restarts.entry(key.clone()).or_insert(0);
            if n > *last {
                self.restarts.with_label_values(&labels_of(key)).inc_by(n - *last);
                *last = n;
            }
        }
        let restarts = &self.restarts;
        self.last_restarts.retain(|key, n| {
            let keep = current.contains(key);
            if !keep && *n > 0 {
                let _ = restarts.remove_label_values(&labels_of(key));
            }
            keep
        });
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encode metrics");
        String::from_utf8(out).expect("exposition is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_counter_lasts_as_long_as_the_monitor_knows_its_group() {
        let mut m = Metrics::new(false);
        let a = ("a.service".to_owned(), "a".to_owned(), None);
        let b = ("b.service".to_owned(), "b".to_owned(), None);
        let line = |name: &str, n: u64| {
            format!("leakmon_restarts_total{{comm=\"{name}\",service=\"{name}.service\"}} {n}")
        };
        m.restarts([(&a, 2), (&b, 1)].into_iter());
        m.restarts([(&a, 3), (&b, 1)].into_iter());
        let text = m.render();
        assert!(text.contains(&line("a", 3)) && text.contains(&line("b", 1)), "{text}");
        // b gone for a window: its counter goes, a's stays.
        m.restarts([(&a, 3)].into_iter());
        let text = m.render();
        assert!(text.contains(&line("a", 3)) && !text.contains("comm=\"b\""), "{text}");
        assert_eq!(m.last_restarts.len(), 1);
        // b back, its count started again by the monitor.
        m.restarts([(&a, 3), (&b, 1)].into_iter());
        assert!(m.render().contains(&line("b", 1)));
    }

    #[test]
    fn renders_the_families_with_their_labels() {
        let mut m = Metrics::new(false);
        m.sampling(16384);
        m.update(
            &[SeriesView::example("anon"), SeriesView::example("heap")],
            Some(Counters::default()),
            3,
            2,
        );
        let text = m.render();
        for line in [
            "leakmon_memory_rss_bytes{comm=\"leaky\",service=\"leaky.service\"} 4096",
            "leakmon_memory_anon_bytes{comm=\"leaky\",service=\"leaky.service\"} 3072",
            "leakmon_memory_swap_bytes{comm=\"leaky\",service=\"leaky.service\"} 1024",
            "leakmon_memory_file_bytes{comm=\"leaky\",service=\"leaky.service\"} 512",
            "leakmon_memory_shmem_bytes{comm=\"leaky\",service=\"leaky.service\"} 256",
            "leakmon_heap_incomplete{comm=\"leaky\",service=\"leaky.service\"} 1",
            "leakmon_heap_live_allocations{comm=\"leaky\",service=\"leaky.service\"} 7",
            "leakmon_leak_suspected{comm=\"leaky\",service=\"leaky.service\",signal=\"anon\"} 1",
            "leakmon_growth_bytes_per_second{comm=\"leaky\",service=\"leaky.service\",signal=\"heap\"} 4096.5",
            "leakmon_time_to_exhaustion_seconds{comm=\"leaky\",service=\"leaky.service\",signal=\"anon\"} 3600",
            "leakmon_stack_live_bytes{comm=\"leaky\",service=\"leaky.service\",stack=\"0123456789ab\"} 4000",
            "leakmon_stack_live_blocks{comm=\"leaky\",service=\"leaky.service\",stack=\"0123456789ab\"} 7",
            "leakmon_sample_bytes 16384",
            "leakmon_stack_info{function=\"leak_small\",location=\"leaks.c:20\",stack=\"0123456789ab\"} 1",
            "leakmon_stack_growth_bytes_per_second{comm=\"leaky\",service=\"leaky.service\",stack=\"0123456789ab\"} 512",
            "leakmon_stack_leak_suspected{comm=\"leaky\",service=\"leaky.service\",stack=\"0123456789ab\"} 1",
            "leakmon_allocator_info{allocator=\"jemalloc\",comm=\"leaky\",service=\"leaky.service\"} 1",
            "leakmon_container_info{comm=\"leaky\",container=\"bbdf01ed86b1fc90cebe7dccf8c111ed095e2077c6096045a230d800942aeb13\",pod_uid=\"\",runtime=\"podman\",service=\"leaky.service\"} 1",
            "leakmon_attached_processes 3",
            "leakmon_bpf_map_errors_total{map=\"stacks\"} 0",
            "leakmon_events_lost_total{source=\"lifecycle_ring\"} 0",
            "leakmon_series_dropped_total 2",
            "leakmon_errors_total{operation=\"purge\"} 0",
            "leakmon_build_info{version=\"",
            "process_resident_memory_bytes ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("pid=\"42\""), "no pid label unless configured");
        let mut with_pid = Metrics::new(true);
        with_pid.update(&[SeriesView::example("anon")], None, 0, 0);
        assert!(
            with_pid.render().contains(
                "leakmon_memory_rss_bytes{comm=\"leaky\",pid=\"42\",service=\"leaky.service\"} 4096"
            ),
            "{}",
            with_pid.render()
        );
        // A series that went away leaves no stale value behind.
        m.update(&[], None, 0, 2);
        assert!(!m.render().contains("leakmon_memory_rss_bytes{"));
    }
}
