//! The options of `run`, declared once, in `cli::RunArgs`. Everything else about an
//! option comes from that declaration: its key in the configuration file (its long
//! flag, or the flag's alias where the file spells it otherwise), the check of a value
//! (the flag's own parser, wherever the value is written), and whether a reload may
//! change it (its help heading, which `--help` shows).
//!
//! Options travel as [`Given`]: the raw values of each option that was set, by id. The
//! command line's and the file's are merged as such, and only then parsed, by clap,
//! into `RunArgs`, so a value means the same on the command line and in the file.

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
};

use clap::{parser::ValueSource, Arg, ArgAction, ArgMatches, Args as _, Command, FromArgMatches as _};

use crate::cli::RunArgs;
pub use crate::cli::{FIXED, LIVE};

/// The options as written, by id: each set option's raw values (one per occurrence).
/// An option not set takes its default when parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Given(BTreeMap<String, Vec<OsString>>);

/// `run`'s options as declared.
fn command() -> Command {
    RunArgs::augment_args(Command::new("run")).no_binary_name(true)
}

/// The option behind each key of the file, in the order declared: every option but
/// `--config` itself.
pub fn keyed() -> Vec<(String, Arg)> {
    command()
        .get_arguments()
        .filter(|a| a.get_id() != "config")
        .filter_map(|a| {
            let long = a.get_long()?;
            let key = a.get_all_aliases().and_then(|aliases| aliases.first().copied()).unwrap_or(long);
            Some((key.to_owned(), a.clone()))
        })
        .collect()
}

/// A switch (`--agent`) as an option with a value, `true` or `false`: a file can then
/// say either, and a set value is always there to keep or to compare.
fn valued(arg: Arg) -> Arg {
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        arg.action(ArgAction::Set).num_args(1).default_value("false").value_parser(clap::value_parser!(bool))
    } else {
        arg
    }
}

/// Whether the option takes a list (it may be given more than once).
pub fn is_list(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

/// Whether the option is a switch, set by `true` or `false` in the file.
pub fn is_switch(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

fn flag(arg: &Arg, value: &OsStr) -> OsString {
    let mut flag = OsString::from(format!("--{}=", arg.get_long().expect("options have long flags")));
    flag.push(value);
    flag
}

/// Checks one value of `arg` with the flag's own parser; the error is one line.
pub fn check(arg: &Arg, value: &OsStr) -> Result<(), String> {
    let alone = Command::new("one").no_binary_name(true).arg(valued(arg.clone()).required(false));
    alone.try_get_matches_from([flag(arg, value)]).map(drop).map_err(|e| one_line(&e))
}

/// What was wrong with a value: the parser's own words where it has them.
fn one_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    if let Some(source) = std::error::Error::source(e) {
        return source.to_string();
    }
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        let value = match e.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(v)) => format!("{v:?} "),
            _ => String::new(),
        };
        return format!("{value}is not one of {}", valid.join(", "));
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

impl Given {
    /// What the command line set (not its defaults).
    pub fn from_command_line(matches: &ArgMatches) -> Self {
        let mut given = Self::default();
        for arg in command().get_arguments() {
            let id = arg.get_id().as_str();
            if matches.value_source(id) == Some(ValueSource::CommandLine) {
                let values =
                    matches.get_raw(id).map(|v| v.map(OsStr::to_owned).collect()).unwrap_or_default();
                given.0.insert(id.to_owned(), values);
            }
        }
        given
    }

    pub fn set(&mut self, id: &str, values: Vec<OsString>) {
        self.0.insert(id.to_owned(), values);
    }

    pub fn get(&self, id: &str) -> Option<&[OsString]> {
        self.0.get(id).map(Vec::as_slice)
    }

    /// `self` over `under`: an option `self` sets wins whole (a list is not added to).
    #[must_use]
    pub fn over(mut self, under: Self) -> Self {
        for (id, values) in under.0 {
            self.0.entry(id).or_insert(values);
        }
        self
    }

    /// The options parsed, defaults filled in.
    pub fn args(&self) -> Result<RunArgs, String> {
        let command = command().mut_args(valued);
        let mut argv = Vec::new();
        for arg in command.get_arguments() {
            for value in self.0.get(arg.get_id().as_str()).into_iter().flatten() {
                argv.push(flag(arg, value));
            }
        }
        let matches = command.try_get_matches_from(argv).map_err(|e| one_line(&e))?;
        RunArgs::from_arg_matches(&matches).map_err(|e| one_line(&e))
    }

    /// `self`, a reload's options, with each option read at start only as `running`
    /// has it; and the keys of those that `self` would have changed.
    #[must_use]
    pub fn keeping_fixed(mut self, running: &Self) -> (Self, Vec<String>) {
        let mut changed = Vec::new();
        for (key, arg) in keyed() {
            if arg.get_help_heading() != Some(FIXED) {
                continue;
            }
            let id = arg.get_id().as_str();
            if self.0.get(id) != running.0.get(id) {
                changed.push(key);
            }
            match running.0.get(id) {
                Some(values) => self.0.insert(id.to_owned(), values.clone()),
                None => self.0.remove(id),
            };
        }
        (self, changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(argv: &[&str]) -> Given {
        let matches = command().try_get_matches_from(argv).expect("parses");
        Given::from_command_line(&matches)
    }

    #[test]
    fn every_option_has_a_key_and_a_reload_rule() {
        let keyed = keyed();
        assert_eq!(keyed.len(), command().get_arguments().count() - 1, "all but --config");
        for (key, arg) in &keyed {
            let heading = arg.get_help_heading();
            assert!(heading == Some(LIVE) || heading == Some(FIXED), "{key}: {heading:?}");
        }
        let keys: Vec<&str> = keyed.iter().map(|(k, _)| k.as_str()).collect();
        for key in ["sample-interval", "pid", "web.listen-address", "web.config-file", "wrappers", "max-live"]
        {
            assert!(keys.contains(&key), "{key} in {keys:?}");
        }
    }

    #[test]
    fn the_command_line_wins_whole_over_the_file() {
        let cli = given(&["--pid", "1", "--agent", "--window", "8m"]);
        let mut file = Given::default();
        file.set("pids", vec!["2".into(), "3".into()]);
        file.set("top", vec!["9".into()]);
        file.set("agent", vec!["false".into()]);
        let args = cli.over(file).args().expect("valid");
        assert_eq!(args.pids, [1]);
        assert_eq!(args.top, 9);
        assert!(args.agent);
        assert_eq!(args.window, std::time::Duration::from_mins(8));
        assert_eq!(args.max_series, 10_000, "a default");
    }

    #[test]
    fn a_reload_keeps_what_is_read_at_start_only_and_names_it() {
        let running = given(&["--max-live", "100", "--window", "8m", "--agent", "--pid", "1"]);
        let next = given(&["--max-live", "200", "--window", "9m", "--pid", "2", "--metrics.pid-label"]);
        let (kept, changed) = next.keeping_fixed(&running);
        assert_eq!(changed, ["agent", "metrics.pid-label", "max-live"]);
        let args = kept.args().expect("valid");
        assert_eq!(args.tables.max_live.get(), 100);
        assert!(args.agent && !args.pid_label);
        assert_eq!((args.window, args.pids.as_slice()), (std::time::Duration::from_mins(9), &[2][..]));
    }

    #[test]
    fn a_value_is_checked_by_its_flag_s_parser() {
        let arg = |key: &str| keyed().into_iter().find(|(k, _)| k == key).expect(key).1;
        assert_eq!(
            check(&arg("max-live"), OsStr::new("0")),
            Err("must be between 1 and 4294967295, not 0".into())
        );
        assert_eq!(
            check(&arg("attach"), OsStr::new("most")),
            Err("\"most\" is not one of none, all, pids, suspects".into())
        );
        assert!(check(&arg("agent"), OsStr::new("true")).is_ok());
        assert!(check(&arg("sample-bytes"), OsStr::new("2GiB")).is_err());
        assert!(check(&arg("web.listen-address"), OsStr::new("nowhere")).is_err());
    }
}
