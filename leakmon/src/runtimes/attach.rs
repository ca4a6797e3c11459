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
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// How long the JVM has to open its socket after SIGQUIT.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a command may run (a class histogram walks the whole heap).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A JVM that answers attach requests.
pub struct Jvm {
    pid: u32,
    socket: PathBuf,
}

impl Jvm {
    /// Asks `pid` to listen for attach requests, unless it already does.
    pub fn attach(pid: u32) -> Result<Self> {
        let ns_pid = ns_pid(pid)?;
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let socket = root.join(format!("tmp/.java_pid{ns_pid}"));
        if listens(&socket) {
            return Ok(Self { pid, socket });
        }
        if !attach_enabled(pid, &root, ns_pid) {
            bail!(
                "pid {pid} runs with -XX:+DisableAttachMechanism: its JVM takes no attach requests, so leakmon cannot ask it for samples"
            );
        }
        if !catches_sigquit(pid)? {
            bail!(
                "pid {pid} does not catch SIGQUIT (started with -Xrs, or still starting): the signal that opens its attach socket would end it"
            );
        }
        // In its working directory first, as jcmd does; /tmp where that is not ours to write.
        let trigger = [
            PathBuf::from(format!("/proc/{pid}/cwd/.attach_pid{ns_pid}")),
            root.join(format!("tmp/.attach_pid{ns_pid}")),
        ]
        .into_iter()
        .find_map(|p| create_trigger(pid, &p).ok().map(|()| p))
        .with_context(|| format!("create .attach_pid{ns_pid} in pid {pid}'s working directory or /tmp"))?;
        let signalled =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGQUIT);
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let mut up = false;
        while signalled.is_ok() && Instant::now() < deadline {
            if listens(&socket) {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&trigger);
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
        let pid = self.pid;
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("connect to pid {pid}'s attach socket {}", self.socket.display()))?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        stream.write_all(&request("jcmd", [line, "", ""]))?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).with_context(|| format!("read pid {pid}'s answer to `{line}`"))?;
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

fn listens(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// The pid the JVM knows itself by: the innermost of its namespaces'.
fn ns_pid(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("no process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or(&pid.to_string())
        .parse()
        .context("NSpid in /proc/PID/status")
}

fn catches_sigquit(pid: u32) -> Result<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("no process {pid}"))?;
    let caught = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or(0);
    Ok(caught & (1 << (libc::SIGQUIT - 1)) != 0)
}

/// The trigger file, owned by the JVM's user (it ignores one a stranger made).
fn create_trigger(pid: u32, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let owner = std::fs::metadata(format!("/proc/{pid}"))?;
    std::fs::File::create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))?;
    Ok(())
}

/// Whether the JVM takes attach requests: the first of the capabilities it publishes
/// in its performance data (what jcmd reads), else its command line and the
/// environment variables the launcher takes options from.
fn attach_enabled(pid: u32, root: &Path, ns_pid: u32) -> bool {
    if let Some(capabilities) =
        perf_data(root, ns_pid).and_then(|d| perf_string(&d, "sun.rt.jvmCapabilities"))
    {
        return capabilities.starts_with('1');
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
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

/// The JVM's `hsperfdata_<user>/<pid>` file, whichever user it runs as.
fn perf_data(root: &Path, ns_pid: u32) -> Option<Vec<u8>> {
    std::fs::read_dir(root.join("tmp"))
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("hsperfdata_"))
        .find_map(|e| std::fs::read(e.path().join(ns_pid.to_string())).ok())
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
