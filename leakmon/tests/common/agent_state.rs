//! The state of a process the agent is loaded into, read from outside: its GOT
//! slots, its tracer, its mappings, its guardian.

use std::{
    os::unix::fs::FileExt as _,
    time::{Duration, Instant},
};

/// The address of `symbol`'s GOT slot in the running executable `pid` (a PIE).
pub fn got_slot(pid: u32, exe: &std::path::Path, symbol: &str) -> u64 {
    use object::{Object as _, ObjectSymbol as _};
    let data = std::fs::read(exe).expect("read the fixture");
    let file = object::File::parse(&*data).expect("parse the fixture");
    let index = file
        .dynamic_symbols()
        .find(|s| s.name() == Ok(symbol))
        .map(|s| s.index())
        .unwrap_or_else(|| panic!("{symbol} is not imported"));
    let offset = file
        .dynamic_relocations()
        .expect("relocations")
        .find(|(_, r)| r.target() == object::RelocationTarget::Symbol(index))
        .map(|(offset, _)| offset)
        .expect("a relocation for the symbol");
    // A position-independent program is loaded at a base of its own; a fixed-address
    // one (-no-pie) where its headers say.
    if file.kind() == object::ObjectKind::Dynamic {
        exe_base(pid, exe) + offset
    } else {
        offset
    }
}

/// Whether the executable `exe` imports `symbol` (calls it through its GOT).
fn imports(exe: &std::path::Path, symbol: &str) -> bool {
    use object::{Object as _, ObjectSymbol as _};
    let data = std::fs::read(exe).expect("read the fixture");
    let file = object::File::parse(&*data).expect("parse the fixture");
    file.dynamic_symbols().any(|s| s.is_undefined() && s.name() == Ok(symbol))
}

/// Where the first mapping of the executable `exe` starts in `pid` (a PIE's base).
pub fn exe_base(pid: u32, exe: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    // Bytes: a fixture may be named with any.
    let maps = std::fs::read(format!("/proc/{pid}/maps")).expect("maps");
    maps.split(|b| *b == b'\n')
        .find(|l| l.ends_with(exe.as_os_str().as_bytes()))
        .and_then(|l| {
            u64::from_str_radix(std::str::from_utf8(l.split(|b| *b == b'-').next()?).ok()?, 16).ok()
        })
        .expect("the executable's first mapping")
}

/// The address of `symbol` of the executable `exe` in `pid`.
pub fn entry_address(pid: u32, exe: &std::path::Path, symbol: &str) -> u64 {
    use object::{Object as _, ObjectSymbol as _};
    let data = std::fs::read(exe).expect("read the fixture");
    let file = object::File::parse(&*data).expect("parse the fixture");
    let address = file.symbols().find(|s| s.name() == Ok(symbol)).map(|s| s.address()).expect("the symbol");
    if file.kind() == object::ObjectKind::Dynamic {
        exe_base(pid, exe) + address
    } else {
        address
    }
}

/// `agent_lifecycle.c` started and ready, answering one command at a time.
pub struct Lifecycle {
    pub process: super::Reap,
    pub pid: u32,
    stdin: std::process::ChildStdin,
    lines: super::Lines,
}

impl Lifecycle {
    pub fn start(fixture: &std::path::Path) -> Self {
        let (mut process, lines) = super::start_ready(std::process::Command::new(fixture), "the fixture");
        let pid = process.0.id();
        let stdin = process.0.stdin.take().expect("stdin");
        Self { process, pid, stdin, lines }
    }

    /// Sends `command` and returns its answer.
    pub fn ask(&mut self, command: &str) -> String {
        use std::io::Write as _;
        writeln!(self.stdin, "{command}").expect("write a command");
        self.lines.next().expect("an answer").expect("read")
    }
}

pub fn read_u64(pid: u32, addr: u64) -> u64 {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    let mut bytes = [0u8; 8];
    mem.read_exact_at(&mut bytes, addr).expect("read mem");
    u64::from_le_bytes(bytes)
}

pub fn agent_mapped(pid: u32) -> bool {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/maps")).expect("maps"))
        .contains("leakmon-agent-")
}

/// The agent's sampling interval in `pid` (0: stopped), read from its `rate`, or
/// `None` where no agent is mapped.
pub fn agent_rate(pid: u32) -> Option<u64> {
    let maps =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/maps")).expect("maps")).into_owned();
    let (base, path) = maps.lines().find_map(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let path = *fields.get(5)?;
        if !path.contains("leakmon-agent-") || fields[2] != "00000000" {
            return None;
        }
        Some((u64::from_str_radix(fields[0].split('-').next()?, 16).ok()?, path.to_owned()))
    })?;
    // A copy in a memory file (a container's) is read through the process.
    let path = if path.starts_with("/memfd:") {
        let range =
            maps.lines().find(|l| l.contains(&path) && l.split_whitespace().nth(2) == Some("00000000"))?;
        format!("/proc/{pid}/map_files/{}", range.split_whitespace().next()?)
    } else {
        path
    };
    let symbols =
        leakmon::agent::inline::AgentSymbols::new(std::path::Path::new(&path), base).expect("symbols");
    Some(read_u64(pid, symbols.get("rate").expect("the agent's rate")))
}

pub fn tracer_of(pid: u32) -> String {
    let status =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/status")).expect("status")).into_owned();
    status.lines().find_map(|l| l.strip_prefix("TracerPid:")).expect("TracerPid").trim().to_owned()
}

/// Whether a guardian (`leakmon agent-session`) for `pid` is still running.
pub fn guardian_of(pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").expect("/proc").flatten().find_map(|e| {
        let other: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let ours = args.iter().any(|a| *a == b"agent-session")
            && args.windows(2).any(|w| w[0] == b"--pid" && w[1] == pid.to_string().as_bytes());
        ours.then_some(other)
    })
}

/// Waits until `pid` is back as it was before any load: untraced, `malloc`'s slot
/// holding `original`, no guardian left, not stopped.
pub fn wait_restored(pid: u32, slot: u64, original: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/stat")).expect("stat")).into_owned();
        let state = state.rsplit(") ").next().and_then(|s| s.split(' ').next()).unwrap_or("?").to_owned();
        let restored = tracer_of(pid) == "0"
            && read_u64(pid, slot) == original
            && guardian_of(pid).is_none()
            && (state == "S" || state == "R");
        if restored {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} not restored: tracer {}, slot {:#x} (was {original:#x}), guardian {:?}, state {state}",
            tracer_of(pid),
            read_u64(pid, slot),
            guardian_of(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `agent_target.c` started and ready, with the word the agent changes to redirect
/// `malloc` (its GOT slot, or its entry in a program that calls it directly) and what
/// it holds before any load.
pub struct AgentTarget {
    pub process: super::Reap,
    pub pid: u32,
    pub slot: u64,
    pub original: u64,
    lines: super::Lines,
    leaked: u32,
}

impl AgentTarget {
    pub fn start() -> Self {
        Self::with(&super::build_fixture("agent_target.c", &[]))
    }

    /// `fixture`, a build of `agent_target.c`.
    pub fn with(fixture: &std::path::Path) -> Self {
        let (process, lines) = super::start_ready(std::process::Command::new(fixture), "agent_target");
        let pid = process.0.id();
        let slot = if imports(fixture, "malloc") {
            got_slot(pid, fixture, "malloc")
        } else {
            entry_address(pid, fixture, "malloc")
        };
        let original = read_u64(pid, slot);
        Self { process, pid, slot, original, lines, leaked: 0 }
    }

    /// Makes it leak once more (SIGUSR1) and waits until it has.
    pub fn leak(&mut self) {
        super::signal(self.pid, nix::sys::signal::Signal::SIGUSR1);
        self.leaked += 1;
        assert_eq!(self.lines.next().expect("a line").expect("read"), format!("leaked {}", self.leaked));
    }

    /// Waits until it is as it was before any load (see [`wait_restored`]).
    pub fn wait_restored(&self) {
        wait_restored(self.pid, self.slot, self.original);
    }
}

/// The moments a `leakmon report --agent` is SIGKILLed at: as soon as its guardian
/// exists (the guardian loads from its start: its ptrace holds last a millisecond each,
/// between which the borrowed thread runs dlopen on its own, so watching for them would
/// miss most), once it logs that it is watching, once its guardian's pace has written
/// the agent's interval in the process (no `--sample-bytes`: from 512 KiB, an idle
/// target's comes down at the first turn, a busy one's goes up), and 30 ms after it
/// starts.
pub const KILL_MOMENTS: [&str; 4] = ["mid-load", "while watching", "while paced", "at once"];

/// Starts `leakmon report --agent` on `pid` for 60 s, lets it reach `moment` (calling
/// `loaded` once it watches), then SIGKILLs and reaps it.
pub fn kill_agent_report_at(pid: u32, moment: &str, loaded: impl FnOnce()) {
    use std::io::BufRead as _;
    let mut report = super::Reap(
        super::leakmon()
            .env("RUST_LOG", "info")
            .args(["report", "--agent", "--format", "json", "--duration", "60", "--pid", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start leakmon"),
    );
    match moment {
        "mid-load" => {
            let deadline = Instant::now() + Duration::from_secs(20);
            while guardian_of(pid).is_none() {
                assert!(Instant::now() < deadline, "no guardian was started for pid {pid}");
                assert!(report.0.try_wait().expect("poll leakmon").is_none(), "leakmon ended early");
            }
        }
        "while watching" | "while paced" => {
            let mut stderr = std::io::BufReader::new(report.0.stderr.take().expect("stderr"));
            let mut line = String::new();
            while !line.contains("watching") {
                line.clear();
                assert!(stderr.read_line(&mut line).expect("read") > 0, "leakmon ended before watching");
            }
            loaded();
            if moment == "while paced" {
                // The pace turns once a second and writes the interval when the ideal is a
                // power of two or more from the one in place. Where the ideal lies depends
                // on how fast this machine runs the fixture (a busy CPython's ideal sat
                // near the start's 512 KiB on a fast day): killed after ten turns even if
                // none wrote, the kill still lands while the pace works on the process
                // (tests/paced.rs checks what the pace chooses).
                let deadline = Instant::now() + Duration::from_secs(10);
                while agent_rate(pid) == Some(512 << 10) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // Down for an idle process, up for a busy one: a power of two either way.
                let rate = agent_rate(pid).expect("the agent is mapped");
                assert!(rate.is_power_of_two(), "paced to {rate}");
            }
        }
        _ => std::thread::sleep(Duration::from_millis(30)),
    }
    super::signal(report.0.id(), nix::sys::signal::Signal::SIGKILL);
    report.0.wait().expect("reap leakmon");
}

/// The state letter of each of `pid`'s threads (`t`: stopped by a tracer).
pub fn thread_states(pid: u32) -> Vec<char> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            stat.rsplit_once(") ")?.1.chars().next()
        })
        .collect()
}

/// Runs on, untraced, none of its threads stopped.
pub fn assert_runs_on(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while (tracer_of(pid) != "0" || thread_states(pid).contains(&'t')) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(tracer_of(pid), "0", "still traced");
    let states = thread_states(pid);
    assert!(!states.is_empty() && !states.iter().any(|s| matches!(s, 't' | 'T' | 'Z')), "threads {states:?}");
}
