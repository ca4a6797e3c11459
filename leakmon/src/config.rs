//! The configuration file (TOML): every `leakmon run` option, settable in a file.
//!
//! In: the file's text. Out: the values it sets, and every problem found, each with its
//! line: syntax errors, unknown keys, wrong types, impossible values. Options given on
//! the command line win over the file.

use std::{ffi::OsString, path::Path};

use clap::Arg;
use toml_edit::{Item, Table, Value};

use crate::options::{self, Given};

/// One problem in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

/// Every key the file knows: the options' keys, and the tables of the dotted ones.
pub fn keys() -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    // A hidden option (a benchmark's switch) is taken but not offered.
    for (key, _) in options::keyed().into_iter().filter(|(_, arg)| !arg.is_hide_set()) {
        let top = key.split_once('.').map_or(key.as_str(), |(table, _)| table).to_owned();
        if !keys.contains(&top) {
            keys.push(top);
        }
    }
    keys
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Reads and checks a file.
pub fn load(path: &Path) -> Result<(Given, Vec<Problem>), std::io::Error> {
    let text = std::fs::read_to_string(path)?;
    let (mut config, problems) = check(&text);
    // A relative web configuration is next to this file, as the certificates a web
    // configuration names are next to it: a service's working directory is `/`.
    if let (Some([web]), Some(dir)) = (config.get("web_config"), path.parent()) {
        if Path::new(web).is_relative() {
            let web = dir.join(web).into_os_string();
            config.set("web_config", vec![web]);
        }
    }
    Ok((config, problems))
}

/// The options of `run` as given: the command line over the `--config` file.
/// Read at start and again on SIGHUP; `matches` are the `run` subcommand's. Errors
/// are one line each (`FILE:LINE: problem` for the file).
pub fn resolve(matches: &clap::ArgMatches) -> Result<(Given, crate::cli::RunArgs), Vec<String>> {
    let mut given = Given::from_command_line(matches);
    if let Some(path) = matches.get_one::<std::path::PathBuf>("config") {
        match load(path) {
            Ok((file, problems)) if problems.is_empty() => given = given.over(file),
            Ok((_, problems)) => {
                return Err(problems
                    .into_iter()
                    .map(|p| format!("{}:{}: {}", path.display(), p.line, p.message))
                    .collect());
            }
            Err(e) => return Err(vec![format!("read config {}: {e}", path.display())]),
        }
    }
    let args = given.args().map_err(|e| vec![e])?;
    Ok((given, args))
}

/// Parses `text`, collecting every problem rather than stopping at the first.
pub fn check(text: &str) -> (Given, Vec<Problem>) {
    let mut config = Given::default();
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            let message = e.message().trim().to_owned();
            return (config, vec![Problem { line, message: format!("syntax error: {message}") }]);
        }
    };
    let keyed = options::keyed();
    let mut problems = Vec::new();
    let at = |item: &Item, message: String| Problem {
        line: item.span().map_or(1, |s| line_of(text, s.start)),
        message,
    };
    let root: &Table = doc.as_table();
    for (key, item) in root {
        if let Some((_, arg)) = keyed.iter().find(|(k, _)| k == key) {
            problems.extend(read(key, arg, item, &mut config).err().map(|m| at(item, m)));
            continue;
        }
        let prefix = format!("{key}.");
        let inner: Vec<&(String, Arg)> = keyed.iter().filter(|(k, _)| k.starts_with(&prefix)).collect();
        if inner.is_empty() {
            let line = root.key(key).and_then(toml_edit::Key::span).map_or(1, |s| line_of(text, s.start));
            problems
                .push(Problem { line, message: format!("unknown key {key} (known: {})", keys().join(", ")) });
            continue;
        }
        let known = inner.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ");
        let Some(table) = item.as_table() else {
            problems.push(at(item, format!("{key} must be a table: [{key}] with {known}")));
            continue;
        };
        for (k, it) in table {
            let full = format!("{prefix}{k}");
            match inner.iter().find(|(key, _)| *key == full) {
                Some((_, arg)) => problems.extend(read(&full, arg, it, &mut config).err().map(|m| at(it, m))),
                None => problems.push(at(it, format!("unknown key {full} (known: {known})"))),
            }
        }
    }
    if let (Some([window]), Some([interval])) = (config.get("window"), config.get("sample_interval")) {
        let duration = |v: &OsString| crate::values::parse_duration(&v.to_string_lossy()).ok();
        if let (Some(window), Some(interval)) = (duration(window), duration(interval)) {
            if interval.checked_mul(10).is_none_or(|ten| window < ten) {
                let item = root.get("window").expect("window was read");
                problems
                    .push(at(item, "window must hold at least 10 samples (10 × sample-interval)".to_owned()));
            }
        }
    }
    problems.sort_by_key(|p| p.line);
    (config, problems)
}

/// One option's value: its raw values, each checked by the flag's parser, into `config`.
fn read(key: &str, arg: &Arg, item: &Item, config: &mut Given) -> Result<(), String> {
    let example = arg.get_default_values().first().map(|d| format!(", like {:?}", d.to_string_lossy()));
    let name = arg.get_value_names().and_then(|n| n.first()).map_or("value".into(), |n| n.to_lowercase());
    let values: Option<Vec<OsString>> = match item.as_value() {
        Some(Value::Boolean(b)) if options::is_switch(arg) => Some(vec![b.value().to_string().into()]),
        _ if options::is_switch(arg) => return Err(format!("{key} must be true or false")),
        Some(Value::Array(list)) if options::is_list(arg) => list.iter().map(scalar).collect(),
        _ if options::is_list(arg) => {
            return Err(format!("{key} must be a list of {name}s, like {key} = [{}]", list_example(arg)));
        }
        Some(v) => scalar(v).map(|v| vec![v]),
        None => None,
    };
    let Some(values) = values else {
        return Err(format!("{key} must be a {name}{}", example.unwrap_or_default()));
    };
    for value in &values {
        options::check(arg, value).map_err(|e| format!("{key}: {e}"))?;
    }
    config.set(arg.get_id().as_str(), values);
    Ok(())
}

/// A single value as a flag would take it: a string, or a number written out.
fn scalar(value: &Value) -> Option<OsString> {
    match value {
        Value::String(s) => Some(s.value().into()),
        Value::Integer(i) => Some(i.value().to_string().into()),
        Value::Float(f) => Some(f.value().to_string().into()),
        _ => None,
    }
}

fn list_example(arg: &Arg) -> String {
    match arg.get_possible_values().as_slice() {
        [] => "...".to_owned(),
        values => values.iter().map(|v| format!("{:?}", v.get_name())).collect::<Vec<_>>().join(", "),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::values::Attach;

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
        let (given, problems) = check(text);
        assert_eq!(problems, vec![]);
        let c = given.args().expect("valid");
        assert_eq!(c.sample_interval, Duration::from_millis(500));
        assert_eq!(c.window, Duration::from_secs(30));
        assert_eq!(c.attach, Some(Attach::Pids));
        assert_eq!(c.pids, vec![1, 2]);
        assert_eq!(c.listen, "127.0.0.1:9999".parse().expect("addr"));
        assert!(c.pid_label);
        assert_eq!((c.top_stacks, c.max_series, c.interval.get(), c.top), (3, 100, 30, 7));
        let t = &c.tables;
        assert_eq!((t.max_live.get(), t.max_totals.get(), t.max_stacks.get()), (1024, 512, 256));
        assert_eq!(t.unwind_rows, 0);
        assert_eq!(t.wrappers, vec!["my_alloc".to_owned(), "pool_*".to_owned()]);
        assert_eq!(c.runtime_profilers, vec![crate::runtimes::Runtime::Node, crate::runtimes::Runtime::Jvm]);
    }

    #[test]
    fn an_unknown_runtime_profiler_is_refused_with_its_line() {
        let (_, problems) = check("top = 3\nruntime-profilers = [\"node\", \"python\"]\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2);
        assert_eq!(problems[0].message, "runtime-profilers: \"python\" is not one of node, jvm");
    }

    #[test]
    fn sample_bytes_in_the_file_has_the_flag_s_bound() {
        let (c, problems) = check("top = 3\nsample-bytes = 2147483648\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2);
        assert!(problems[0].message.contains("above the largest sampling interval, 1GiB"), "{problems:?}");
        assert_eq!(c.get("sample_bytes"), None);
        let (c, problems) = check("sample-bytes = 65536\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.args().expect("valid").tables.sample_bytes, 65536);
    }

    #[test]
    fn a_comm_longer_than_the_kernel_keeps_is_refused_with_its_line() {
        let (c, problems) = check("top = 3\ncomm = [\"nginx\", \"a-very-long-service-name\"]\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 2);
        assert!(problems[0].message.contains("kernel keeps only a process name's first 15"), "{problems:?}");
        assert!(problems[0].message.contains("\"a-very-long-ser\""), "{problems:?}");
        assert_eq!(c.get("comms"), None);
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
        let text = "window = \"5s\"\nsample-interval = true\nattach = \"most\"\nbogus = 1\nmax-live = 0\n[web]\nlisten-address = \"nowhere\"\nport = 1\n";
        let (_, problems) = check(text);
        let lines: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.message.as_str())).collect();
        assert_eq!(
            lines,
            vec![
                (2, "sample-interval must be a duration, like \"10s\""),
                (3, "attach: \"most\" is not one of none, all, pids, suspects"),
                (4, "unknown key bogus (known: sample-interval, window, memory-source, attach, agent, suspect-duration, max-suspects, runtime-profilers, pid, comm, cgroup, web, metrics, top-stacks, max-series, interval, top, max-live, max-totals, max-stacks, sample-bytes, unwind-rows, wrappers, suppress)"),
                (5, "max-live: must be between 1 and 4294967295, not 0"),
                (7, "web.listen-address: invalid socket address syntax"),
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
            let key = prop::sample::select(super::super::keys());
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
