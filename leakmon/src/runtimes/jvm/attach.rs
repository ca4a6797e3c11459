//! HotSpot's attach protocol, the one `jcmd` speaks, without a JDK on the host.
//!
//! A JVM listens on `/tmp/.java_pid<pid>` once asked: a `.attach_pid<pid>` file owned
//! by its user, then SIGQUIT. Both paths are the JVM's own (its mount namespace, its
//! pid there), reached through `/proc/PID/root`. A request names a command and three
//! arguments; the answer is a status line and the command's output.
//!
//! Nothing is sent that could end the process: SIGQUIT only to a JVM that catches it
//! (`-Xrs` leaves the default action, a core dump), and nothing at all to one whose
//! attach mechanism is off (`-XX:+DisableAttachMechanism`), which would print a thread
//! dump instead of listening.

use std::{
    io::{Read as _, Write as _},
    os::{fd::AsFd as _, unix::net::UnixStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::untrusted::{
    create_as, cwd_of, read_text, remove_if_same, Identity, Pinned, TargetRoot, PROC_TEXT_LIMIT,
};

/// How long the JVM has to open its socket after SIGQUIT.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a command may run (a class histogram walks the whole heap).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest answer read: a class histogram of a heap of a million classes is
/// about 100 MiB; nothing leakmon asks for comes near.
const ANSWER_LIMIT: u64 = 128 << 20;
/// The longest performance-data file read.
const PERF_DATA_LIMIT: u64 = 16 << 20;

/// A JVM that answers attach requests.
pub struct Jvm {
    pid: u32,
    socket: PathBuf,
}

impl Jvm {
    /// Asks `pid` to listen for attach requests, unless it already does.
    pub fn attach(pid: u32) -> Result<Self> {
        let proc_root = Path::new("/proc");
        // Pinned first: every check below is of this process, and SIGQUIT goes to it
        // or to none.
        let process = Pinned::open(pid).with_context(|| format!("no process {pid}"))?;
        let ns_pid = ns_pid(pid)?;
        let root = TargetRoot::of(proc_root, pid).with_context(|| format!("open pid {pid}'s root"))?;
        let socket = PathBuf::from(format!("/proc/{pid}/root/tmp/.java_pid{ns_pid}"));
        if listens(&socket, pid) {
            return Ok(Self { pid, socket });
        }
        if !attach_enabled(pid, &root, ns_pid) {
            bail!(
                "pid {pid} runs with -XX:+DisableAttachMechanism: its JVM takes no attach requests, so leakmon cannot ask it for samples"
            );
        }
        if !process.catches(proc_root, libc::SIGQUIT).with_context(|| format!("no process {pid}"))? {
            bail!(
                "pid {pid} does not catch SIGQUIT (started with -Xrs, or still starting): the signal that opens its attach socket would end it"
            );
        }
        // The JVM honours a trigger its own user owns; it is made as that user, new,
        // in its working directory first (as jcmd does), else in its /tmp: never
        // through a link the JVM's user planted, never over a file that exists.
        let who = Identity::of(proc_root, pid).with_context(|| format!("no process {pid}"))?;
        let name = format!(".attach_pid{ns_pid}");
        let cwd = cwd_of(proc_root, pid);
        let tmp = root.dir(Path::new("/tmp"));
        let mut refused = Vec::new();
        let mut made = None;
        for (place, dir) in [("working directory", cwd), ("/tmp", tmp)] {
            match dir.and_then(|dir| create_as(dir.as_fd(), &name, who, 0o600).map(|file| (dir, file))) {
                Ok(done) => {
                    made = Some(done);
                    break;
                }
                Err(e) => refused.push(format!("{place}: {e}")),
            }
        }
        let Some((dir, trigger)) = made else {
            bail!("pid {pid}: could not create {name} as its user ({})", refused.join("; "));
        };
        let signalled = process.signal(libc::SIGQUIT);
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let mut up = false;
        while signalled.is_ok() && Instant::now() < deadline {
            if listens(&socket, pid) {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = remove_if_same(dir.as_fd(), &name, &trigger);
        signalled
            .map_err(|e| anyhow::anyhow!("signal pid {pid} (SIGQUIT) to open its attach socket: {e}"))?;
        if !up {
            bail!("pid {pid} opened no attach socket within {LISTEN_TIMEOUT:?} of SIGQUIT");
        }
        Ok(Self { pid, socket })
    }

    /// Runs a diagnostic command (`JFR.start ...`, `GC.class_histogram`), as `jcmd PID
    /// LINE` does, and returns its output. A command the JVM refuses is an error with
    /// the JVM's words.
    pub fn jcmd(&self, line: &str) -> Result<String> {
        self.jcmd_within(line, COMMAND_TIMEOUT)
    }

    /// [`Jvm::jcmd`], for a command that may take up to `timeout` (a dump whose paths
    /// to GC roots JFR searches for as long as it is let).
    pub fn jcmd_within(&self, line: &str, timeout: Duration) -> Result<String> {
        let pid = self.pid;
        let mut stream = connect(&self.socket, pid)
            .with_context(|| format!("connect to pid {pid}'s attach socket {}", self.socket.display()))?;
        let deadline = std::time::Instant::now() + timeout;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        stream.write_all(&request("jcmd", [line, "", ""]))?;
        let mut answer = Vec::new();
        // A JVM's answers are a few KiB (a class histogram of a large heap, a few MiB).
        (&mut stream).take(ANSWER_LIMIT + 1).read_to_end(&mut answer).with_context(|| {
            let late = if std::time::Instant::now() >= deadline {
                format!(" (none within {timeout:?})")
            } else {
                String::new()
            };
            format!("read pid {pid}'s answer to `{line}`{late}")
        })?;
        if answer.len() as u64 > ANSWER_LIMIT {
            bail!("pid {pid}'s answer to `{line}` is over {ANSWER_LIMIT} bytes");
        }
        let (status, output) = answer_of(&answer)?;
        if status != 0 {
            bail!("pid {pid} refused `{line}`: {}", output.trim());
        }
        Ok(output)
    }
}

/// Protocol version 1: `1`, the command and three arguments, each ending in a NUL.
fn request(command: &str, args: [&str; 3]) -> Vec<u8> {
    let mut out = b"1\0".to_vec();
    for part in std::iter::once(command).chain(args) {
        out.extend_from_slice(part.as_bytes());
        out.push(0);
    }
    out
}

/// The status on the answer's first line, and the rest.
fn answer_of(answer: &[u8]) -> Result<(i32, String)> {
    let text = String::from_utf8_lossy(answer);
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let status = first.trim().parse().with_context(|| format!("an attach answer starting {first:?}"))?;
    Ok((status, rest.to_owned()))
}

fn listens(socket: &Path, pid: u32) -> bool {
    connect(socket, pid).is_ok()
}

/// Connects to the socket at `path` if the JVM `pid` itself listens there: the path is
/// the JVM user's to plant, and a link there could lead root to any other socket.
fn connect(path: &Path, pid: u32) -> Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
    if u32::try_from(peer.pid()).ok() != Some(pid) {
        bail!("{} is a socket of pid {}, not of the JVM {pid}", path.display(), peer.pid());
    }
    Ok(stream)
}

/// The pid the JVM knows itself by: the innermost of its namespaces'.
fn ns_pid(pid: u32) -> Result<u32> {
    let status =
        crate::procfs::ProcRoot::default().status(pid).with_context(|| format!("no process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or(&pid.to_string())
        .parse()
        .context("NSpid in /proc/PID/status")
}

/// Whether the JVM takes attach requests: the first of the capabilities it publishes
/// in its performance data (what jcmd reads), else its command line and the
/// environment variables the launcher takes options from.
fn attach_enabled(pid: u32, root: &TargetRoot, ns_pid: u32) -> bool {
    if let Some(capabilities) =
        perf_data(root, ns_pid).and_then(|d| perf_string(&d, "sun.rt.jvmCapabilities"))
    {
        return capabilities.starts_with('1');
    }
    let cmdline = read_text(Path::new(&format!("/proc/{pid}/cmdline")), PROC_TEXT_LIMIT).unwrap_or_default();
    let environ = read_text(Path::new(&format!("/proc/{pid}/environ")), PROC_TEXT_LIMIT).unwrap_or_default();
    let (cmdline, environ) = (cmdline.as_bytes(), environ.as_bytes());
    let options = environ.split(|b| *b == 0).filter(|v| {
        [&b"JAVA_TOOL_OPTIONS="[..], b"JDK_JAVA_OPTIONS=", b"_JAVA_OPTIONS="].iter().any(|k| v.starts_with(k))
    });
    let mut disabled = false;
    for arg in cmdline.split(|b| *b == 0).chain(options.flat_map(|v| v.split(|b| *b == b' ' || *b == b'='))) {
        match arg {
            b"-XX:+DisableAttachMechanism" => disabled = true,
            b"-XX:-DisableAttachMechanism" => disabled = false,
            _ => {}
        }
    }
    !disabled
}

/// The JVM's `hsperfdata_<user>/<pid>` file, whichever user it runs as, read inside
/// its root and bounded (HotSpot's is 64 KiB unless `-XX:PerfDataMemorySize` says more).
fn perf_data(root: &TargetRoot, ns_pid: u32) -> Option<Vec<u8>> {
    let (_, names) = root.names(Path::new("/tmp"), 100_000).ok()?;
    names.iter().filter(|n| n.starts_with("hsperfdata_")).take(64).find_map(|n| {
        let path = Path::new("/tmp").join(n).join(ns_pid.to_string());
        root.read(&path, PERF_DATA_LIMIT).ok()
    })
}

/// A string counter from HotSpot's performance data: a prologue naming the byte order
/// and where the entries start, then entries each naming their name's and value's
/// offsets.
fn perf_string(data: &[u8], wanted: &str) -> Option<String> {
    if data.get(..4)? != [0xca, 0xfe, 0xc0, 0xc0] {
        return None;
    }
    let little = *data.get(4)? == 1;
    let i32_at = |at: usize| -> Option<i32> {
        let b: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        Some(if little { i32::from_le_bytes(b) } else { i32::from_be_bytes(b) })
    };
    let cstr = |at: usize, max: usize| -> Option<&[u8]> {
        let bytes = data.get(at..at.checked_add(max)?.min(data.len()))?;
        Some(&bytes[..bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len())])
    };
    let mut entry = usize::try_from(i32_at(24)?).ok()?;
    let count = i32_at(28)?;
    for _ in 0..count {
        let length = usize::try_from(i32_at(entry)?).ok()?;
        let name = cstr(entry + usize::try_from(i32_at(entry + 4)?).ok()?, 256)?;
        if name == wanted.as_bytes() {
            let vector = usize::try_from(i32_at(entry + 8)?).ok()?;
            let value = cstr(entry + usize::try_from(i32_at(entry + 16)?).ok()?, vector)?;
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        if length == 0 {
            return None;
        }
        entry += length;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_the_version_the_command_and_three_arguments_each_ending_in_nul() {
        assert_eq!(request("jcmd", ["VM.version", "", ""]), b"1\0jcmd\0VM.version\0\0\0");
    }

    #[test]
    fn an_answer_is_a_status_line_and_the_output() {
        assert_eq!(
            answer_of(b"0\nStarted recording 1.\n").unwrap(),
            (0, "Started recording 1.\n".to_owned())
        );
        assert_eq!(answer_of(b"1\n").unwrap().0, 1);
        assert!(answer_of(b"HTTP/1.1 400").is_err());
    }
}
