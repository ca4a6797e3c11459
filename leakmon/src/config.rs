//! The configuration file (TOML): every `leakmon run` option, settable in a file.
//!
//! In: the file's text. Out: the values it sets, and every problem found, each with its
//! line: syntax errors, unknown keys, wrong types, impossible values. Options given on
//! the command line win over the file.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use toml_edit::{Item, Table, Value};

use crate::values::{parse_duration, Attach};

/// Values the file sets; `None` where it is silent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileConfig {
    pub sample_interval: Option<Duration>,
    pub window: Option<Duration>,
    pub attach: Option<Attach>,
    pub agent: Option<bool>,
    pub suspect_duration: Option<Duration>,
    pub max_suspects: Option<usize>,
    pub runtime_profilers: Option<Vec<crate::runtimes::Runtime>>,
    pub pids: Option<Vec<u32>>,
    pub comms: Option<Vec<String>>,
    pub cgroups: Option<Vec<String>>,
    pub listen: Option<SocketAddr>,
    pub pid_label: Option<bool>,
    pub top_stacks: Option<usize>,
    pub max_series: Option<usize>,
    pub interval: Option<u32>,
    pub top: Option<usize>,
    pub max_live: Option<u32>,
    pub max_totals: Option<u32>,
    pub max_stacks: Option<u32>,
    pub unwind_rows: Option<u32>,
    pub sample_bytes: Option<u64>,
    pub wrappers: Option<Vec<String>>,
    pub suppress: Option<Vec<String>>,
    pub web_config: Option<PathBuf>,
}

/// One problem in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

/// The keys of the top level, for "did you mean" and the unknown-key check.
const KEYS: &[&str] = &[
    "sample-interval",
    "window",
    "attach",
    "agent",
    "suspect-duration",
    "max-suspects",
    "runtime-profilers",
    "pid",
    "comm",
    "cgroup",
    "top-stacks",
    "max-series",
    "interval",
    "top",
    "max-live",
    "max-totals",
    "max-stacks",
    "unwind-rows",
    "sample-bytes",
    "wrappers",
    "suppress",
    "web",
    "metrics",
];

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Reads and checks a file.
pub fn load(path: &Path) -> Result<(FileConfig, Vec<Problem>), std::io::Error> {
    let text = std::fs::read_to_string(path)?;
    let (mut config, problems) = check(&text);
    // A relative web configuration is next to this file, as the certificates a web
    // configuration names are next to it: a service's working directory is `/`.
    if let (Some(web), Some(dir)) = (config.web_config.as_mut(), path.parent()) {
        if web.is_relative() {
            *web = dir.join(&*web);
        }
    }
    Ok((config, problems))
}

/// Parses `text`, collecting every problem rather than stopping at the first.
pub fn check(text: &str) -> (FileConfig, Vec<Problem>) {
    let mut config = FileConfig::default();
    let mut problems = Vec::new();
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            let message = e.message().trim().to_owned();
            return (config, vec![Problem { line, message: format!("syntax error: {message}") }]);
        }
    };
    let root: &Table = doc.as_table();
    let mut p = |item: &Item, message: String| {
        problems.push(Problem { line: item.span().map_or(1, |s| line_of(text, s.start)), message });
    };
    let mut unknown = Vec::new();
    for (key, item) in root {
        let value = item.as_value();
        match key {
            "sample-interval" => config.sample_interval = duration(key, value).map_err(|m| p(item, m)).ok(),
            "window" => config.window = duration(key, value).map_err(|m| p(item, m)).ok(),
            "suspect-duration" => config.suspect_duration = duration(key, value).map_err(|m| p(item, m)).ok(),
            "max-suspects" => config.max_suspects = count(key, value, 1).map_err(|m| p(item, m)).ok(),
            "attach" => config.attach = attach(value).map_err(|m| p(item, m)).ok(),
            "agent" => {
                config.agent = value.and_then(Value::as_bool);
                if config.agent.is_none() {
                    p(item, "agent must be true or false".to_owned());
                }
            }
            "runtime-profilers" => config.runtime_profilers = runtimes(value).map_err(|m| p(item, m)).ok(),
            "pid" => config.pids = pids(value).map_err(|m| p(item, m)).ok(),
            "comm" => config.comms = comms(value).map_err(|m| p(item, m)).ok(),
            "cgroup" => config.cgroups = strings(key, value).map_err(|m| p(item, m)).ok(),
            "top-stacks" => config.top_stacks = count(key, value, 0).map_err(|m| p(item, m)).ok(),
            "max-series" => config.max_series = count(key, value, 1).map_err(|m| p(item, m)).ok(),
            "top" => config.top = count(key, value, 0).map_err(|m| p(item, m)).ok(),
            "interval" => {
                config.interval = count(key, value, 1).map_err(|m| p(item, m)).ok().map(|v| v as u32);
            }
            "max-live" => {
                config.max_live = count(key, value, 1).map_err(|m| p(item, m)).ok().map(|v| v as u32);
            }
            "max-totals" => {
                config.max_totals = count(key, value, 1).map_err(|m| p(item, m)).ok().map(|v| v as u32);
            }
            "max-stacks" => {
                config.max_stacks = count(key, value, 1).map_err(|m| p(item, m)).ok().map(|v| v as u32);
            }
            "wrappers" => {
                config.wrappers =
                    function_names(key, value, r#"["my_alloc", "pool_*"]"#).map_err(|m| p(item, m)).ok();
            }
            "suppress" => {
                config.suppress =
                    function_names(key, value, r#"["my_pool_init", "arena_*"]"#).map_err(|m| p(item, m)).ok();
            }
            "sample-bytes" => config.sample_bytes = sample_bytes(value).map_err(|m| p(item, m)).ok(),
            "unwind-rows" => {
                config.unwind_rows = count(key, value, 0).map_err(|m| p(item, m)).ok().map(|v| v as u32);
            }
            "web" => web(item, &mut config, &mut p),
            "metrics" => metrics(item, &mut config, &mut p),
            _ => unknown.push(key),
        }
    }
    for key in unknown {
        let line = root.key(key).and_then(toml_edit::Key::span).map_or(1, |s| line_of(text, s.start));
        problems.push(Problem { line, message: format!("unknown key {key} (known: {})", KEYS.join(", ")) });
    }
    if let (Some(window), Some(interval)) = (config.window, config.sample_interval) {
        if interval.checked_mul(10).is_none_or(|ten| window < ten) {
            let item = root.get("window").expect("window was read");
            problems.push(Problem {
                line: item.span().map_or(1, |s| line_of(text, s.start)),
                message: "window must hold at least 10 samples (10 × sample-interval)".to_owned(),
            });
        }
    }
    problems.sort_by_key(|p| p.line);
    (config, problems)
}

fn attach(value: Option<&Value>) -> Result<Attach, String> {
    match value.and_then(Value::as_str) {
        Some("none") => Ok(Attach::None),
        Some("all") => Ok(Attach::All),
        Some("pids") => Ok(Attach::Pids),
        Some("suspects") => Ok(Attach::Suspects),
        _ => Err("attach must be \"none\", \"suspects\", \"all\" or \"pids\"".to_owned()),
    }
}

fn runtimes(value: Option<&Value>) -> Result<Vec<crate::runtimes::Runtime>, String> {
    value
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|v| v.as_str().and_then(crate::runtimes::Runtime::from_name)).collect())
        .ok_or_else(|| {
            "runtime-profilers must be a list of \"node\" and \"jvm\", like [\"node\", \"jvm\"]".to_owned()
        })
}

fn pids(value: Option<&Value>) -> Result<Vec<u32>, String> {
    value
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|v| v.as_integer().and_then(|i| u32::try_from(i).ok())).collect())
        .ok_or_else(|| "pid must be a list of process ids, like [1234, 5678]".to_owned())
}

fn strings(key: &str, value: Option<&Value>) -> Result<Vec<String>, String> {
    value
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_owned)).collect())
        .ok_or_else(|| format!("{key} must be a list of strings, like [\"nginx\"]"))
}

/// Process names, each as `--comm` takes it.
fn comms(value: Option<&Value>) -> Result<Vec<String>, String> {
    strings("comm", value)?.iter().map(|c| crate::values::parse_comm(c)).collect()
}

/// A size, or a bare count of bytes: through the flag's parser, whose bound (1 GiB)
/// holds for the file too.
fn sample_bytes(value: Option<&Value>) -> Result<u64, String> {
    match value {
        Some(Value::String(s)) => {
            crate::values::parse_bytes(s.value()).map_err(|e| format!("sample-bytes: {e}"))
        }
        Some(v) if v.as_integer().is_some_and(|n| n >= 0) => {
            crate::values::parse_bytes(&v.as_integer().expect("an integer").to_string())
                .map_err(|e| format!("sample-bytes: {e}"))
        }
        _ => Err("sample-bytes must be a size, like \"512KiB\", or 0 for exact".to_owned()),
    }
}

/// The `[web]` table.
fn web(item: &Item, config: &mut FileConfig, p: &mut impl FnMut(&Item, String)) {
    let Some(web) = item.as_table() else {
        return p(item, "web must be a table: [web] with listen-address = \"ADDR:PORT\"".to_owned());
    };
    for (k, it) in web {
        if k == "listen-address" {
            config.listen = it.as_value().and_then(Value::as_str).and_then(|a| a.parse().ok());
            if config.listen.is_none() {
                p(it, "web.listen-address must be an address and port, like \"127.0.0.1:9473\"".to_owned());
            }
        } else if k == "config-file" {
            config.web_config = it.as_value().and_then(Value::as_str).map(PathBuf::from);
            if config.web_config.is_none() {
                p(it, "web.config-file must be a path, like \"/etc/leakmon/web.yml\"".to_owned());
            }
        } else {
            p(it, format!("unknown key web.{k} (known: web.listen-address, web.config-file)"));
        }
    }
}

/// The `[metrics]` table.
fn metrics(item: &Item, config: &mut FileConfig, p: &mut impl FnMut(&Item, String)) {
    let Some(metrics) = item.as_table() else {
        return p(item, "metrics must be a table: [metrics] with pid-label = true|false".to_owned());
    };
    for (k, it) in metrics {
        if k == "pid-label" {
            config.pid_label = it.as_value().and_then(Value::as_bool);
            if config.pid_label.is_none() {
                p(it, "metrics.pid-label must be true or false".to_owned());
            }
        } else {
            p(it, format!("unknown key metrics.{k} (known: metrics.pid-label)"));
        }
    }
}

fn duration(key: &str, value: Option<&Value>) -> Result<Duration, String> {
    let text = value
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{key} must be a duration string, like \"10s\""))?;
    parse_duration(text).map_err(|e| format!("{key}: {e}"))
}

/// A list of function names (a trailing `*` makes a prefix), as `wrappers` and
/// `suppress` take.
fn function_names(key: &str, value: Option<&Value>, example: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = value
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_owned)).collect())
        .ok_or_else(|| format!("{key} must be a list of function names, like {example}"))?;
    list.iter().try_for_each(|name| crate::wrappers::validate(name))?;
    Ok(list)
}

fn count(key: &str, value: Option<&Value>, min: i64) -> Result<usize, String> {
    let n = value.and_then(Value::as_integer).ok_or_else(|| format!("{key} must be a whole number"))?;
    if n < min || n > i64::from(u32::MAX) {
        return Err(format!("{key} must be between {min} and {}, not {n}", u32::MAX));
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_option() {
        let text = r#"
sample-interval = "0.5s"
window = "30s"
attach = "pids"
pid = [1, 2]
top-stacks = 3
max-series = 100
interval = 30
top = 7
max-live = 1024
max-totals = 512
max-stacks = 256
unwind-rows = 0
wrappers = ["my_alloc", "pool_*"]
runtime-profilers = ["node", "jvm"]

[web]
listen-address = "127.0.0.1:9999"

[metrics]
pid-label = true
"#;
        let (c, problems) = check(text);
        assert_eq!(problems, vec![]);
        assert_eq!(c.sample_interval, Some(Duration::from_millis(500)));
        assert_eq!(c.window, Some(Duration::from_secs(30)));
        assert_eq!(c.attach, Some(Attach::Pids));
        assert_eq!(c.pids, Some(vec![1, 2]));
        assert_eq!(c.listen, Some("127.0.0.1:9999".parse().expect("addr")));
        assert_eq!(c.pid_label, Some(true));
        assert_eq!((c.top_stacks, c.max_series, c.interval, c.top), (Some(3), Some(100), Some(30), Some(7)));
        assert_eq!((c.max_live, c.max_totals, c.max_stacks), (Some(1024), Some(512), Some(256)));
        assert_eq!(c.unwind_rows, Some(0));
        assert_eq!(c.wrappers, Some(vec!["my_alloc".to_owned(), "pool_*".to_owned()]));
        assert_eq!(
            c.runtime_profilers,
            Some(vec![crate::runtimes::Runtime::Node, crate::runtimes::Runtime::Jvm])
        );
    }

    #[test]
    fn an_unknown_runtime_profiler_is_refused_with_its_line() {
        let (_, problems) = check("top = 3\nruntime-profilers = [\"node\", \"python\"]\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2);
        assert!(problems[0].message.contains(r#"list of "node" and "jvm""#), "{problems:?}");
    }

    #[test]
    fn sample_bytes_in_the_file_has_the_flag_s_bound() {
        let (c, problems) = check("top = 3\nsample-bytes = 2147483648\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2);
        assert!(problems[0].message.contains("above the largest sampling interval, 1GiB"), "{problems:?}");
        assert_eq!(c.sample_bytes, None);
        let (c, problems) = check("sample-bytes = 65536\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.sample_bytes, Some(65536));
    }

    #[test]
    fn a_comm_longer_than_the_kernel_keeps_is_refused_with_its_line() {
        let (c, problems) = check("top = 3\ncomm = [\"nginx\", \"a-very-long-service-name\"]\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2);
        assert!(problems[0].message.contains("kernel keeps only a process name's first 15"), "{problems:?}");
        assert!(problems[0].message.contains("\"a-very-long-ser\""), "{problems:?}");
        assert_eq!(c.comms, None);
    }

    #[test]
    fn a_bad_wrapper_is_refused_with_its_line() {
        let (_, problems) = check("top = 3\nwrappers = [\"ok\", \"two stars**\"]\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2);
        assert!(problems[0].message.contains("prefix ending in one"), "{problems:?}");
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let text = "window = \"5s\"\nsample-interval = 3\nattach = \"most\"\nbogus = 1\nmax-live = 0\n[web]\nlisten-address = \"nowhere\"\nport = 1\n";
        let (_, problems) = check(text);
        let lines: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.message.as_str())).collect();
        assert_eq!(
            lines,
            vec![
                (2, "sample-interval must be a duration string, like \"10s\""),
                (3, "attach must be \"none\", \"suspects\", \"all\" or \"pids\""),
                (4, "unknown key bogus (known: sample-interval, window, attach, agent, suspect-duration, max-suspects, runtime-profilers, pid, comm, cgroup, top-stacks, max-series, interval, top, max-live, max-totals, max-stacks, unwind-rows, sample-bytes, wrappers, suppress, web, metrics)"),
                (5, "max-live must be between 1 and 4294967295, not 0"),
                (7, "web.listen-address must be an address and port, like \"127.0.0.1:9473\""),
                (8, "unknown key web.port (known: web.listen-address, web.config-file)"),
            ]
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let (_, problems) = check("window = \"10s\"\n\nattach = = \"all\"\n");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, 3);
        assert!(problems[0].message.starts_with("syntax error"), "{:?}", problems[0]);
    }

    #[test]
    fn a_window_too_short_for_its_samples() {
        let (_, problems) = check("sample-interval = \"10s\"\nwindow = \"20s\"\n");
        assert_eq!(
            problems,
            vec![Problem {
                line: 2,
                message: "window must hold at least 10 samples (10 × sample-interval)".into()
            }]
        );
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::check;

        /// Lines built from the real keys, values of every TOML kind (and broken ones),
        /// and sections: the parser sees plausible files, not only noise.
        fn line() -> impl Strategy<Value = String> {
            let key = prop::sample::select(super::super::KEYS.to_vec()).prop_map(str::to_owned);
            let value = prop_oneof![
                any::<i64>().prop_map(|v| v.to_string()),
                any::<f64>().prop_map(|v| v.to_string()),
                "\"[0-9a-z. :]{0,12}\"",
                // Durations of any size: 40 digits overflow every integer and Duration.
                "\"[0-9]{1,40}(\\.[0-9]{0,20})?(ms|s|m|h|)\"",
                any::<f64>().prop_map(|v| format!("\"{v}s\"")),
                Just("true".to_owned()),
                Just("[1, \"x\"]".to_owned()),
                Just("{ a = 1 }".to_owned()),
                "[^\n]{0,16}",
            ];
            prop_oneof![
                (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
                Just("[web]".to_owned()),
                Just("[metrics]".to_owned()),
                "[^\n]{0,24}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever the file, the checker answers (never panics), and every problem
            /// it reports names a line that exists.
            #[test]
            fn never_panics_and_problems_have_real_lines(lines in prop::collection::vec(line(), 0..12)) {
                let text = lines.join("\n");
                let (_, problems) = check(&text);
                let count = text.lines().count().max(1);
                for p in problems {
                    prop_assert!(p.line >= 1 && p.line <= count + 1, "line {} of {count}: {}", p.line, p.message);
                    prop_assert!(!p.message.is_empty());
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(text in "\\PC{0,200}") {
                let _ = check(&text);
            }
        }

        /// The kept corpus, `tests/corpus/config`: inputs that once mattered (each kind
        /// of mistake, sizes past any integer, deep nesting, invalid UTF-8). Every file
        /// is answered without a panic: `good-*` with no problem, `bad-*` with at least
        /// one, each on a line of the file, or (not text at all) an I/O error.
        #[test]
        fn the_corpus_replays() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/config");
            let mut files = 0;
            for entry in std::fs::read_dir(&dir).expect("corpus directory") {
                let path = entry.expect("corpus entry").path();
                let name = path.file_name().expect("name").to_string_lossy().into_owned();
                let good = name.starts_with("good-");
                assert!(good || name.starts_with("bad-"), "{name}: corpus files are good-* or bad-*");
                match super::super::load(&path) {
                    Ok((_, problems)) => {
                        assert_eq!(problems.is_empty(), good, "{name}: {problems:?}");
                        let text = std::fs::read_to_string(&path).expect("text");
                        let count = text.lines().count().max(1);
                        for p in problems {
                            assert!(p.line >= 1 && p.line <= count + 1, "{name}: line {} of {count}", p.line);
                        }
                    }
                    Err(e) => assert!(!good && e.kind() == std::io::ErrorKind::InvalidData, "{name}: {e}"),
                }
                files += 1;
            }
            assert!(files >= 20, "{files} corpus files");
        }
    }
}
