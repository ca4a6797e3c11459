//! Option values as the flags and the configuration file both spell them: durations,
//! byte counts, process names, what to attach to. One parser each, so that a value means
//! the same wherever it is written.

use std::time::Duration;

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Attach {
    None,
    All,
    Pids,
    Suspects,
}

/// Where the always-on tier reads every process's memory counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum MemorySource {
    /// The walk over the kernel's processes where the kernel has what it needs, else
    /// /proc.
    #[default]
    Auto,
    /// The walk over the kernel's processes, or refuse to start.
    Iterator,
    /// /proc alone.
    Proc,
}

/// The sampling interval when none is given, for the agent and for the runtimes' own
/// profilers alike: one sample per 512 KiB allocated. (V8's own default, 32 KiB, took a
/// fifth of an allocation-bound Node.js's speed; see `cargo xtask bench --node-only`.)
pub const DEFAULT_SAMPLE_BYTES: u64 = 512 * 1024;

/// The interval of a sampler that always samples (the agent, a runtime's profiler).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    /// As given (`--sample-bytes`).
    Fixed(u64),
    /// From this one, paced to the process's allocation rate (the agent's
    /// `agent::pace`, V8's `runtimes::node::pace`).
    Paced(u64),
}

impl Interval {
    /// `--sample-bytes` as given: 0 (exact, the tables' default) means none, and the
    /// interval is paced from [`DEFAULT_SAMPLE_BYTES`].
    pub fn from_option(sample_bytes: u64) -> Self {
        match sample_bytes {
            0 => Self::Paced(DEFAULT_SAMPLE_BYTES),
            bytes => Self::Fixed(bytes),
        }
    }

    /// The interval sampling starts at.
    pub fn start(self) -> u64 {
        match self {
            Self::Fixed(bytes) | Self::Paced(bytes) => bytes,
        }
    }

    pub fn paced(self) -> bool {
        matches!(self, Self::Paced(_))
    }
}

/// `500ms`, `0.5s`, `30s`, `10m`, `1h`, or a bare number of seconds.
/// The longest duration any option takes: a year. Longer ones are surely a mistake, and
/// a bound keeps every product of them (`10 × sample-interval`) far from overflow.
pub const MAX_DURATION: Duration = Duration::from_hours(365 * 24);

/// A duration from the command line or the configuration: `500ms`, `0.5s`, `10m`, `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("{text:?} is not a duration (try 500ms, 0.5s, 10m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (use ms, s, m or h)")),
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("{text:?} must be longer than zero"));
    }
    if seconds > MAX_DURATION.as_secs_f64() {
        return Err(format!("{text:?} is longer than a year"));
    }
    match Duration::from_secs_f64(seconds) {
        d if d.is_zero() => Err(format!("{text:?} is shorter than a nanosecond")),
        d => Ok(d),
    }
}

/// A process name as the kernel keeps it (`comm`): at most 15 bytes, so a longer one
/// would match nothing, ever.
pub fn parse_comm(text: &str) -> Result<String, String> {
    match text.len() {
        0 => Err("comm: an empty process name matches nothing".to_owned()),
        1..=15 => Ok(text.to_owned()),
        n => Err(format!(
            "comm {text:?} is {n} bytes: the kernel keeps only a process name's first 15 (comm), so it would match nothing; give those ({:?})",
            String::from_utf8_lossy(&text.as_bytes()[..15])
        )),
    }
}

/// A byte count: a number, optionally with B, KiB, MiB or GiB.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 =
        number.parse().map_err(|_| format!("{text:?} is not a byte count (like 65536 or 512KiB)"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} in {text:?} (use B, KiB, MiB or GiB)")),
    };
    let bytes = number.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes > leakmon_common::sampling::MAX_RATE {
        return Err(format!("{text:?} is above the largest sampling interval, 1GiB"));
    }
    Ok(bytes)
}

/// A count from `MIN` to `u32::MAX`, as every count option takes (the kernel tables'
/// sizes are `u32`, and the same bound keeps the others sane).
pub fn parse_count<const MIN: u32, T: TryFrom<u32>>(text: &str) -> Result<T, String> {
    let n: i128 = text.trim().parse().map_err(|_| format!("{text:?} is not a whole number"))?;
    u32::try_from(n)
        .ok()
        .filter(|&n| n >= MIN)
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("must be between {MIN} and {}, not {n}", u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_mins(10)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
        // Regressions: these panicked in Duration::from_secs_f64.
        for huge in ["99999999999999999999s", "1e300s", "9999999999999999h", "400d"] {
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
        assert_eq!(
            parse_duration("365d"),
            Err("unknown unit \"d\" in \"365d\" (use ms, s, m or h)".to_owned())
        );
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
        assert!(parse_duration("8761h").is_err());
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count::<1, usize>("7"), Ok(7));
        assert_eq!(parse_count::<0, u32>("0"), Ok(0));
        assert_eq!(parse_count::<1, u32>("0"), Err("must be between 1 and 4294967295, not 0".to_owned()));
        assert_eq!(
            parse_count::<1, std::num::NonZeroU32>("-5"),
            Err("must be between 1 and 4294967295, not -5".to_owned())
        );
        assert!(parse_count::<0, u32>("4294967296").is_err());
        assert_eq!(parse_count::<0, u32>("many"), Err("\"many\" is not a whole number".to_owned()));
    }

    proptest::proptest! {
        /// Any number with any unit: an answer, never a panic, and never past the bound.
        #[test]
        fn any_duration_text_is_answered(number in proptest::num::f64::ANY, unit in "(ms|s|m|h|)") {
            if let Ok(d) = parse_duration(&format!("{number}{unit}")) {
                proptest::prop_assert!(d <= MAX_DURATION && !d.is_zero());
            }
        }

        #[test]
        fn any_digits_are_answered(digits in "[0-9]{1,40}(\\.[0-9]{0,40})?", unit in "(ms|s|m|h|)") {
            let _ = parse_duration(&format!("{digits}{unit}"));
        }
    }
}
