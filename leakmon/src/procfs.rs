//! Readers of /proc: a process's mappings, name and existence.
//!
//! Every reader takes the proc root as a parameter so tests can point it at a fixture
//! tree. Mapped files are opened through `/proc/PID/root` so a process in another
//! mount namespace resolves to its own files, not ours.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Errors reading /proc.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The process does not exist (or has exited).
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    /// Any other read failure.
    #[error("read {path}")]
    Read { path: PathBuf, source: io::Error },
}

/// One file-backed mapping of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub executable: bool,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The path as the process sees it.
    pub path: PathBuf,
    /// The file was deleted (or replaced) since it was mapped: `path` no longer names it.
    pub deleted: bool,
}

impl Mapping {
    /// Where to open the file from outside the process, given its `/proc/PID/root`:
    /// through that root, or, once deleted, through `/proc/PID/map_files`, which still
    /// reaches the mapped file itself.
    pub fn open_path(&self, root: &Path) -> PathBuf {
        if self.deleted {
            root.with_file_name("map_files").join(format!("{:x}-{:x}", self.start, self.end))
        } else {
            root.join(self.path.strip_prefix("/").unwrap_or(&self.path))
        }
    }

    /// The file offset of `addr`, which must lie in this mapping.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// Where /proc is; `/proc` outside tests.
#[derive(Clone, Debug)]
pub struct ProcRoot(PathBuf);

impl Default for ProcRoot {
    fn default() -> Self {
        Self(PathBuf::from("/proc"))
    }
}

impl ProcRoot {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    fn read(&self, pid: u32, file: &str) -> Result<String, ProcError> {
        let path = self.0.join(pid.to_string()).join(file);
        // Bytes, not UTF-8: a process names itself (and its files) with any bytes.
        crate::untrusted::read_text(&path, crate::untrusted::PROC_TEXT_LIMIT).map_err(|source| {
            match source.kind() {
                io::ErrorKind::NotFound => ProcError::NoSuchProcess { pid },
                _ if source.raw_os_error() == Some(libc::ESRCH) => ProcError::NoSuchProcess { pid },
                _ => ProcError::Read { path, source },
            }
        })
    }

    /// The proc root itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn exists(&self, pid: u32) -> bool {
        self.0.join(pid.to_string()).join("stat").exists()
    }

    /// Whether the process still runs: it exists and is not a zombie waiting to be
    /// reaped (its memory, mappings and threads are gone).
    pub fn running(&self, pid: u32) -> bool {
        let Ok(stat) = self.read(pid, "stat") else { return false };
        // The state follows the name, which is in parentheses and may hold any byte.
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        !matches!(state, None | Some('Z' | 'X' | 'x'))
    }

    /// The process's file-backed mappings, in address order.
    pub fn maps(&self, pid: u32) -> Result<Vec<Mapping>, ProcError> {
        Ok(self.read(pid, "maps")?.lines().filter_map(parse_maps_line).collect())
    }

    /// The text of the process's `maps`, anonymous mappings included.
    pub fn maps_text(&self, pid: u32) -> Result<String, ProcError> {
        self.read(pid, "maps")
    }

    /// The ids of the process's threads.
    pub fn tasks(&self, pid: u32) -> Result<Vec<u32>, ProcError> {
        let path = self.0.join(pid.to_string()).join("task");
        let dir = fs::read_dir(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ProcError::NoSuchProcess { pid },
            _ => ProcError::Read { path, source },
        })?;
        Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
    }

    /// The value of `key` (`AT_ENTRY`, `AT_BASE`, ...) in the process's auxiliary
    /// vector, if it has one.
    pub fn auxv(&self, pid: u32, key: u64) -> Result<Option<u64>, ProcError> {
        let path = self.0.join(pid.to_string()).join("auxv");
        let auxv = fs::read(&path).map_err(|source| ProcError::Read { path, source })?;
        Ok(auxv
            .as_chunks::<8>()
            .0
            .as_chunks::<2>()
            .0
            .iter()
            .find_map(|[k, v]| (u64::from_ne_bytes(*k) == key).then(|| u64::from_ne_bytes(*v))))
    }

    /// The pid of the process's tracer (a debugger, strace, leakmon's own hold), from
    /// its `status`; `None` when nothing traces it.
    pub fn tracer(&self, pid: u32) -> Result<Option<u32>, ProcError> {
        let status = self.status(pid)?;
        let tracer =
            status.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|t| t.trim().parse().ok());
        Ok(tracer.filter(|t| *t != 0))
    }

    /// The process's `status` text (any bytes of its name taken as text).
    pub fn status(&self, pid: u32) -> Result<String, ProcError> {
        self.read(pid, "status")
    }

    /// The process a task belongs to (its thread group): `pid` itself for a process,
    /// another for one of its threads.
    pub fn thread_group(&self, pid: u32) -> Result<u32, ProcError> {
        let status = self.status(pid)?;
        status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok()).ok_or_else(
            || ProcError::Read {
                path: self.0.join(pid.to_string()).join("status"),
                source: io::Error::new(io::ErrorKind::InvalidData, "no Tgid line"),
            },
        )
    }

    /// Refuses what is not a running process: no such pid, or a thread's id.
    pub fn check_process(&self, pid: u32) -> Result<(), String> {
        match self.thread_group(pid) {
            Err(_) if !self.exists(pid) => Err(format!("no process with pid {pid}")),
            Err(e) => Err(format!("pid {pid}: {e}")),
            Ok(tgid) if tgid != pid => Err(format!(
                "{pid} is a thread of process {tgid}, not a process: name the process (--pid {tgid})"
            )),
            Ok(_) => Ok(()),
        }
    }

    /// The process's short name (`comm`), without the newline.
    pub fn comm(&self, pid: u32) -> Result<String, ProcError> {
        Ok(self.read(pid, "comm")?.trim_end().to_owned())
    }

    /// A path inside the process's mount namespace, as seen from ours.
    pub fn in_root(&self, pid: u32, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap_or(path);
        self.0.join(pid.to_string()).join("root").join(relative)
    }

    /// Every numeric entry: the pids of all processes.
    pub fn pids(&self) -> Result<Vec<u32>, ProcError> {
        let dir = fs::read_dir(&self.0).map_err(|source| ProcError::Read { path: self.0.clone(), source })?;
        Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
    }
}

/// Parses one line of /proc/PID/maps; `None` for anonymous or special mappings.
pub fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next()?.trim_start();
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    // A file deleted while mapped still resolves through /proc/PID/map_files, but its
    // path no longer names it.
    let (path, deleted) = path.strip_suffix(" (deleted)").map_or((path, false), |p| (p, true));
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode,
        path: PathBuf::from(path),
        deleted,
    })
}

/// A `Key:   123 kB` line of /proc/PID/status, in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
}

/// The mapping that contains `addr`, from a list in address order.
pub fn find_mapping(maps: &[Mapping], addr: u64) -> Option<&Mapping> {
    let i = maps.partition_point(|m| m.start <= addr);
    maps[..i].last().filter(|m| addr < m.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234 /usr/bin/fixture
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234 /usr/bin/fixture
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 [heap]
7f1000028000-7f10001bd000 r-xp 00028000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f2000000000-7f2000001000 r-xp 00000000 fe:01 77 /tmp/gone (deleted)
";

    fn maps() -> Vec<Mapping> {
        LINES.lines().filter_map(parse_maps_line).collect()
    }

    #[test]
    fn parses_file_mappings_and_skips_anonymous() {
        let maps = maps();
        assert_eq!(maps.len(), 4);
        let libc = &maps[2];
        assert_eq!(libc.start, 0x7f10_0002_8000);
        assert_eq!(libc.offset, 0x28000);
        assert!(libc.executable);
        assert_eq!((libc.dev_major, libc.dev_minor, libc.inode), (0xfe, 1, 99));
        assert_eq!(libc.path, Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(!maps[0].executable);
        assert_eq!(maps[3].path, Path::new("/tmp/gone"));
        // Deleted: opened through the mapping itself, not its old path.
        assert!(maps[3].deleted && !libc.deleted);
        let root = Path::new("/proc/42/root");
        assert_eq!(maps[3].open_path(root), Path::new("/proc/42/map_files/7f2000000000-7f2000001000"));
        assert_eq!(libc.open_path(root), Path::new("/proc/42/root/usr/lib/x86_64-linux-gnu/libc.so.6"));
    }

    #[test]
    fn finds_the_mapping_of_an_address() {
        let maps = maps();
        let m = find_mapping(&maps, 0x55d0_c0a0_1abc).expect("in text");
        assert_eq!(m.file_offset(0x55d0_c0a0_1abc), 0x1abc);
        assert!(find_mapping(&maps, 0x55d0_c0a0_2000).is_none());
        assert!(find_mapping(&maps, 0x10).is_none());
    }

    #[test]
    fn reads_a_fixture_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_dir = dir.path().join("42");
        fs::create_dir_all(&pid_dir).expect("mkdir");
        fs::write(pid_dir.join("maps"), LINES).expect("maps");
        fs::write(pid_dir.join("comm"), "fixture\n").expect("comm");
        fs::write(pid_dir.join("stat"), "42 (fixture) S").expect("stat");
        fs::write(pid_dir.join("status"), b"Name:\tfix\xfeture\nTgid:\t42\n").expect("status");
        let thread = dir.path().join("43");
        fs::create_dir_all(&thread).expect("mkdir");
        fs::write(thread.join("stat"), "43 (fixture) S").expect("stat");
        fs::write(thread.join("status"), "Name:\tfixture\nTgid:\t42\n").expect("status");
        let root = ProcRoot::new(dir.path());
        assert_eq!(root.maps(42).expect("maps").len(), 4);
        assert_eq!(root.comm(42).expect("comm"), "fixture");
        assert!(root.exists(42));
        assert!(root.running(42));
        assert_eq!(root.check_process(42), Ok(()), "a name that is not UTF-8 is read");
        assert_eq!(
            root.check_process(43).unwrap_err(),
            "43 is a thread of process 42, not a process: name the process (--pid 42)"
        );
        assert_eq!(root.check_process(45).unwrap_err(), "no process with pid 45");
        fs::remove_dir_all(&thread).expect("rm");
        assert!(!root.running(43));
        // A zombie, whose name holds ") Z": the state is read after the last one.
        let zombie = dir.path().join("44");
        fs::create_dir_all(&zombie).expect("mkdir");
        fs::write(zombie.join("stat"), "44 (a) S (b) Z 1 44").expect("stat");
        assert!(root.exists(44) && !root.running(44));
        fs::remove_dir_all(&zombie).expect("rm");
        assert!(matches!(root.comm(43), Err(ProcError::NoSuchProcess { pid: 43 })));
        assert_eq!(root.pids().expect("pids"), vec![42]);
        assert_eq!(
            root.in_root(42, Path::new("/usr/lib/libc.so.6")),
            dir.path().join("42/root/usr/lib/libc.so.6")
        );
    }
}
