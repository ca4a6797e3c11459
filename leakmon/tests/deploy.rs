//! deploy/: the Prometheus rules and their unit tests (promtool), and the Grafana
//! dashboard, checked against a real leakmon scraped by a real Prometheus: every metric
//! the rules and the dashboard name is one leakmon exports, every dashboard query runs,
//! and the rules load and evaluate cleanly.

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{build_fixture, http_get, Reap};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19482";
const PROMETHEUS: &str = "127.0.0.1:19091";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool").args(args).current_dir(dir).output().expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn rules_pass_promtool_and_every_alert_has_firing_and_silent_cases() {
    let dir = deploy("prometheus");
    let checked = promtool(&["check", "rules", "leakmon.rules.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "leakmon.rules.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");

    let rules = std::fs::read_to_string(dir.join("leakmon.rules.yml")).expect("rules");
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    // Each `alertname:` line of the tests, and whether the `exp_alerts` after it is empty.
    let tests = std::fs::read_to_string(dir.join("leakmon.rules.test.yml")).expect("tests");
    let mut cases: Vec<(String, bool)> = Vec::new();
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname: ") {
            cases.push((name.to_owned(), false));
        } else if let (Some(rest), Some(last)) = (line.strip_prefix("exp_alerts:"), cases.last_mut()) {
            last.1 = rest.trim() != "[]";
        }
    }
    for alert in &alerts {
        assert!(cases.iter().any(|(n, fires)| n == alert && *fires), "{alert} has no firing case");
        assert!(cases.iter().any(|(n, fires)| n == alert && !*fires), "{alert} has no silent case");
    }
}

/// Metric names an expression reads: leakmon's and the process collector's, not the
/// names of recording rules (`level:metric:operation`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if token.contains(':') {
            continue;
        }
        if (token.starts_with("leakmon_") || token.starts_with("process_")) && token.len() > "leakmon_".len()
        {
            out.insert(token.to_owned());
        }
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(expr: &str) -> Value {
    let body = http_get(PROMETHEUS, &format!("/api/v1/query?query={}", url_encode(expr)))
        .unwrap_or_else(|| panic!("query Prometheus: {expr}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("Prometheus answer ({e}): {body}"))
}

/// Every panel target of the dashboard: (panel title, expression).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().expect("title").to_owned(),
                target["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    out
}

#[test]
fn the_dashboard_is_well_formed() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/leakmon.json")).expect("read"))
            .expect("JSON");
    assert_eq!(dashboard["uid"], "leakmon");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(ids.insert(p["id"].as_u64().expect("id")), "duplicate id at {title}");
        let grid = &p["gridPos"];
        let at = |k: &str| grid[k].as_u64().unwrap_or_else(|| panic!("{title}: gridPos {grid}"));
        let (left, top, width, height) = (at("x"), at("y"), at("w"), at("h"));
        assert!(left + width <= 24, "{title} is wider than the grid");
        for cell in (left..left + width).flat_map(|cx| (top..top + height).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "{title} overlaps another panel at {cell:?}");
        }
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
            assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "{title} has no query");
            assert!(p["description"].as_str().is_some_and(|d| !d.is_empty()), "{title} has no description");
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in ["Host overview", "Service", "leakmon health", "Top growing stacks", "Time to exhaustion"] {
        assert!(titles.contains(&wanted), "no {wanted:?} panel");
    }
}

/// Grafana's own dashboard schema, as its published TypeScript types (@grafana/schema):
/// the dashboard, as an object literal typed `Dashboard`, must compile under `tsc
/// --strict` (wrong types, unknown fields and missing required ones all fail).
#[test]
fn the_dashboard_matches_grafanas_schema() {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/grafana-schema");
    let tsc = tools.join("node_modules/.bin/tsc");
    assert!(tsc.exists(), "{} is missing: `cargo xtask test` installs it", tsc.display());
    let json = std::fs::read_to_string(deploy("grafana/leakmon.json")).expect("read");
    // A string cannot stand for a TypeScript enum member: name the one enum used.
    let literal = json.replace("\"mode\": \"absolute\"", "\"mode\": ThresholdsMode.Absolute");
    let check = tools.join(format!("check-{}.ts", std::process::id()));
    std::fs::write(
        &check,
        format!(
            "import {{ Dashboard, ThresholdsMode }} from '@grafana/schema';\nconst dashboard: Dashboard = {literal};\nexport default dashboard;\n"
        ),
    )
    .expect("write check");
    let out = Command::new(&tsc)
        .args([
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--moduleResolution",
            "node",
            "--module",
            "commonjs",
        ])
        .args(["--target", "es2020"])
        .arg(&check)
        .current_dir(&tools)
        .output()
        .expect("run tsc");
    let _ = std::fs::remove_file(&check);
    assert!(
        out.status.success(),
        "the dashboard does not match Grafana's schema:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, start to end")]
fn rules_and_dashboard_read_only_what_leakmon_exports() {
    let grow = build_fixture("grow.c", &[]);
    let leaky = common::named(&grow, "grow_deploy");
    let victim = common::named(&grow, "grow_dep_oom");
    let _daemon = common::start_daemon(
        &["--attach", "pids", "--comm", "grow_deploy", "--sample-interval", "0.5s", "--window", "10s"],
        LISTEN,
    );

    let rules = deploy("prometheus/leakmon.rules.yml");
    let _prometheus = common::start_prometheus(PROMETHEUS, LISTEN, Some(&rules));

    // A leak that is restarted once (restarts_total), with stacks (heap and stack
    // families), and one OOM kill in a small cgroup (oom_kills_total).
    let first = Reap(Command::new(&leaky).arg("two_sites").spawn().expect("start"));
    std::thread::sleep(Duration::from_secs(4));
    drop(first);
    let _second = Reap(Command::new(&leaky).arg("two_sites").spawn().expect("start"));
    let cgroup = common::Cgroup::with_limit(&format!("leakmon-deploy-test-{}", std::process::id()), 32 << 20);
    let status = cgroup.run(&victim, "oom");
    assert!(!status.success(), "the victim is OOM-killed");

    // Wait until the scrape has every family we expect to see.
    let wanted = [
        "leakmon_stack_leak_suspected",
        "leakmon_restarts_total",
        "leakmon_oom_kills_total",
        "leakmon_time_to_exhaustion_seconds",
    ];
    let start = Instant::now();
    let scrape = loop {
        let text = http_get(LISTEN, "/metrics").unwrap_or_default();
        if wanted.iter().all(|w| text.contains(&format!("\n{w}{{"))) {
            break text;
        }
        assert!(start.elapsed() < Duration::from_mins(1), "families missing after a minute:\n{text}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();

    // Every metric the rules and the dashboard read is exported.
    let rules = std::fs::read_to_string(deploy("prometheus/leakmon.rules.yml")).expect("rules");
    let rule_exprs: Vec<String> = {
        let mut exprs = Vec::new();
        let mut lines = rules.lines().peekable();
        while let Some(line) = lines.next() {
            let Some(rest) = line.trim().strip_prefix("expr:") else { continue };
            let mut expr = rest.trim().to_owned();
            if expr == "|" {
                expr.clear();
                while let Some(next) = lines.peek().filter(|l| l.starts_with("          ")) {
                    expr.push_str(next.trim());
                    expr.push(' ');
                    lines.next();
                }
            }
            exprs.push(expr);
        }
        exprs
    };
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/leakmon.json")).expect("read"))
            .expect("JSON");
    let panel_queries = dashboard_queries(&dashboard);
    let mut read = BTreeSet::new();
    for expr in rule_exprs.iter().chain(panel_queries.iter().map(|(_, e)| e)) {
        read.extend(metric_names(expr));
    }
    let missing: Vec<&String> = read.difference(&exported).collect();
    assert!(missing.is_empty(), "read but not exported: {missing:?}\nexported: {exported:?}");
    assert!(read.len() >= 15, "{read:?}");

    // Prometheus has scraped a while and evaluated the rules: every dashboard query
    // runs, the key ones return data, and every rule evaluates cleanly.
    std::thread::sleep(Duration::from_secs(3));
    let substitute = |e: &str| e.replace("$instance", ".*").replace("$service", ".*").replace("$comm", ".*");
    for (title, expr) in &panel_queries {
        let answer = query(&substitute(expr));
        assert_eq!(answer["status"], "success", "{title}: {expr}: {answer}");
    }
    let rows = |title: &str| -> usize {
        panel_queries
            .iter()
            .filter(|(t, _)| t == title)
            .map(|(_, e)| query(&substitute(e))["data"]["result"].as_array().map_or(0, Vec::len))
            .sum()
    };
    for title in [
        "Top growing stacks",
        "Memory over time, with the projected slope",
        "Restarts and OOM kills",
        "leakmon up",
    ] {
        assert!(rows(title) > 0, "{title} shows nothing");
    }
    let stacks =
        query(&substitute(&panel_queries.iter().find(|(t, _)| t == "Top growing stacks").expect("panel").1));
    let functions: Vec<&str> = stacks["data"]["result"]
        .as_array()
        .expect("result")
        .iter()
        .filter_map(|r| r["metric"]["function"].as_str())
        .collect();
    assert!(functions.contains(&"touch"), "the growing stack is named: {functions:?}");

    let rules_state: Value =
        serde_json::from_str(&http_get(PROMETHEUS, "/api/v1/rules").expect("rules API")).expect("JSON");
    let groups = rules_state["data"]["groups"].as_array().expect("groups");
    let names: BTreeSet<&str> = groups.iter().filter_map(|g| g["name"].as_str()).collect();
    assert_eq!(names, BTreeSet::from(["leakmon.alerts", "leakmon.rules"]));
    for rule in groups.iter().flat_map(|g| g["rules"].as_array().into_iter().flatten()) {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    let replacements =
        query("instance_service_comm:leakmon_replacements:increase1h{comm=~\"grow_deploy|grow_dep_oom\"}");
    let comms: BTreeSet<&str> = replacements["data"]["result"]
        .as_array()
        .expect("result")
        .iter()
        .filter_map(|r| r["metric"]["comm"].as_str())
        .collect();
    assert_eq!(comms, BTreeSet::from(["grow_dep_oom", "grow_deploy"]), "{replacements}");
}

#[test]
fn the_scrape_config_example_passes_promtool() {
    // The example names the rules where the package installs them; check it against
    // the ones in the tree.
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(deploy("prometheus/prometheus.yml")).expect("read");
    let shipped = "/usr/share/leakmon/prometheus/leakmon.rules.yml";
    assert!(example.contains(shipped));
    let rules = deploy("prometheus/leakmon.rules.yml");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, example.replace(shipped, &rules.display().to_string())).expect("write");
    let out = promtool(&["check", "config", &config.display().to_string()], dir.path());
    assert!(out.contains("is valid prometheus config file syntax"), "{out}");
}

#[test]
fn the_kubernetes_manifest_validates_and_matches_the_unit() {
    let manifest = deploy("kubernetes/leakmon.yaml");
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&manifest)
        .output()
        .expect("run kubernetes-validate (installed by `cargo xtask test`)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("passed for resource daemonset/leakmon"), "{text}");

    let yaml = std::fs::read_to_string(&manifest).expect("read");
    assert!(yaml.contains("hostPID: true"), "every process of the node");
    // The DaemonSet grants exactly the unit's capabilities.
    let added: BTreeSet<String> = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: "))
        .expect("capabilities.add")
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|c| format!("CAP_{}", c.trim().trim_matches('"')))
        .collect();
    let unit = std::fs::read_to_string(deploy("systemd/leakmon.service")).expect("unit");
    let bounding: BTreeSet<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(added, bounding);

    // Its configuration passes `leakmon config check`.
    let toml: String = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("leakmon.toml: |"))
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .flat_map(|l| [&l[4..], "\n"])
        .collect();
    assert!(toml.contains("listen-address"), "{toml}");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("leakmon.toml");
    std::fs::write(&file, toml).expect("write");
    let out = common::leakmon().args(["config", "check"]).arg(&file).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
