//! A process that allocates as fast as it can beside a quiet one that leaks, with a
//! live-allocation table barely larger than what the quiet one keeps at its peak (about
//! 4,400 blocks; with 4,096 entries it alone overflows the table): the quiet one's
//! leak comes out exactly, the busy one's millions of pairs leave nothing behind (no
//! drift from a lost free), and nothing is dropped.

mod common;

use common::{build_fixture, by_function, expected, named, parse_report, processes, LEAKS};

#[test]
fn a_busy_process_beside_a_quiet_leak_changes_neither_ones_figures() {
    let busy = named(&build_fixture("churn.c", &[]), "busy_churn");
    let quiet = build_fixture("leaks.c", &[]);
    // The busy one starts first and runs through the quiet one's whole life.
    let script = format!("{} 2000000 >/dev/null & sleep 0.5; {}; wait", busy.display(), quiet.display());
    let out = common::leakmon()
        .args(["report", "--format", "json", "--max-live", "5000", "--", "sh", "-c", &script])
        .output()
        .expect("run leakmon");
    let report = parse_report(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("not fully accounted"), "nothing dropped: {stderr}");
    let of = |comm: &str| {
        processes(&report)
            .iter()
            .find(|p| p["comm"] == comm)
            .unwrap_or_else(|| panic!("no {comm} in {report:#}"))
            .clone()
    };
    let (quiet, busy) = (of("leaks"), of("busy_churn"));
    assert_eq!(by_function(&quiet, "leaks.c"), expected(LEAKS), "{quiet:#}");
    assert_eq!(quiet["incomplete"], false);
    // Two million malloc(64)+free pairs: not one block of the loop left over.
    assert_eq!(by_function(&busy, "churn.c"), expected(&[]), "{busy:#}");
    assert_eq!(busy["incomplete"], false);
}
