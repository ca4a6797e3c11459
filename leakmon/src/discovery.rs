//! Which files to probe, and which allocator each process uses.
//!
//! A process allocates through whichever `malloc` the dynamic linker finds first: its
//! executable's own (a static program, a Rust program with a jemalloc global
//! allocator), a preloaded or linked allocator library (jemalloc, tcmalloc, mimalloc),
//! else its C library's. So every executable mapping is a candidate, whatever its name:
//! each file is opened once (by device, inode, size and mtime), its symbol tables say
//! whether it carries allocator entry points and which allocator it is, and the answer
//! is cached.
//!
//! Sources: a process's /proc/PID/maps (opened through /proc/PID/root, so containers
//! resolve to their own files); for a program held at its exec, its `DT_NEEDED` libraries
//! found through the dynamic linker's cache (`ldconfig -p`) and its `LD_PRELOAD`. Never a
//! bare library name.

use std::{
    collections::{BTreeSet, HashMap},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use tracing::debug;

use crate::{
    probes::targets::{file_targets, Allocator},
    procfs::{Mapping, ProcRoot},
};

/// Files remembered at most; past it the cache starts over (a host maps a few hundred
/// distinct executable files, so this only bounds a pathological churn of binaries).
pub const MAX_CACHED_FILES: usize = 8192;

/// A file's identity, including what changes when it is replaced in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
}

/// What a file means for allocation tracking.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileInfo {
    /// It has entry points to probe.
    probe: bool,
    allocator: Option<Allocator>,
    interposes: bool,
    needed: std::sync::Arc<[String]>,
}

/// The allocator files of one process and the allocator it uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFiles {
    /// Files to probe, as paths openable from here.
    pub files: Vec<PathBuf>,
    /// The allocator its `malloc` calls reach, when known.
    pub allocator: Option<Allocator>,
}

/// The file cache; one per daemon or report.
pub struct Discovery {
    proc_root: ProcRoot,
    files: HashMap<FileKey, FileInfo>,
    /// The linker cache by library name, read once (`ldconfig -p` is a process spawn).
    linker_cache: Option<HashMap<String, PathBuf>>,
}

impl Discovery {
    pub fn new(proc_root: ProcRoot) -> Self {
        Self { proc_root, files: HashMap::new(), linker_cache: None }
    }

    pub fn proc_root(&self) -> &ProcRoot {
        &self.proc_root
    }

    /// Number of files classified so far.
    pub fn cached_files(&self) -> usize {
        self.files.len()
    }

    fn classify(&mut self, path: &Path) -> Option<FileInfo> {
        let meta = std::fs::metadata(path).ok()?;
        let key = FileKey { dev: meta.dev(), ino: meta.ino(), size: meta.size(), mtime: meta.mtime() };
        if let Some(info) = self.files.get(&key) {
            return Some(info.clone());
        }
        let info = match file_targets(path) {
            Ok(t) => FileInfo {
                probe: !t.entry_points.is_empty(),
                allocator: t.allocator,
                interposes: t.interposes,
                needed: t.needed.into(),
            },
            Err(e) => {
                // Not an ELF file we can read (a mapped font, a truncated binary): nothing to probe.
                debug!("{:#}", anyhow::Error::from(e));
                FileInfo { probe: false, allocator: None, interposes: false, needed: Vec::new().into() }
            }
        };
        if self.files.len() >= MAX_CACHED_FILES {
            self.files.clear();
        }
        self.files.insert(key, info.clone());
        Some(info)
    }

    /// The allocator files `pid` maps and the allocator it uses.
    pub fn process(&mut self, pid: u32) -> ProcessFiles {
        let Ok(maps) = self.proc_root.maps(pid) else { return ProcessFiles::default() };
        self.of_maps(pid, &maps)
    }

    /// The same, from mappings of `pid` already read.
    pub fn of_maps(&mut self, pid: u32, maps: &[Mapping]) -> ProcessFiles {
        let exe = std::fs::read_link(self.proc_root.path().join(pid.to_string()).join("exe")).ok();
        let mut seen = BTreeSet::new();
        let mut files = Vec::new();
        let (mut own, mut interposed, mut libc) = (None, None, None);
        for m in maps.iter().filter(|m| m.executable) {
            if !seen.insert((m.dev_major, m.dev_minor, m.inode)) {
                continue;
            }
            let path = m.open_path(&self.proc_root.in_root(pid, Path::new("/")));
            let Some(info) = self.classify(&path) else { continue };
            if info.probe {
                files.push(path);
            }
            let Some(allocator) = info.allocator else { continue };
            // /proc/PID/exe reads "PATH (deleted)" once the file is gone; maps says PATH.
            let is_exe = exe.as_deref().is_some_and(|e| m.path == e || m.path == strip_deleted(e));
            if is_exe {
                own = Some(allocator);
            } else if allocator.is_libc() {
                libc = libc.or(Some(allocator));
            } else if info.interposes {
                interposed = interposed.or(Some(allocator));
            }
        }
        ProcessFiles { files, allocator: own.or(interposed).or(libc) }
    }

    /// The allocator files of a process held just after its exec: those its image maps
    /// already (a static allocator) and those its `LD_PRELOAD` names.
    pub fn image(&mut self, pid: u32) -> Vec<PathBuf> {
        let mut files = self.process(pid).files;
        if let Ok(exe) = std::fs::read_link(self.proc_root.path().join(pid.to_string()).join("exe")) {
            files.extend(self.needed_by(&self.proc_root.in_root(pid, &exe)));
        }
        let environ =
            std::fs::read(self.proc_root.path().join(pid.to_string()).join("environ")).unwrap_or_default();
        for var in environ.split(|&b| b == 0) {
            if let Some(value) = var.strip_prefix(b"LD_PRELOAD=") {
                let value = String::from_utf8_lossy(value).into_owned();
                let root = self.proc_root.in_root(pid, Path::new("/"));
                let inside: Vec<String> = value
                    .split([':', ' '])
                    .filter(|s| s.starts_with('/'))
                    .map(|s| root.join(s.trim_start_matches('/')).display().to_string())
                    .collect();
                files.extend(self.preloaded(&inside.join(":")));
            }
        }
        files
    }

    /// Allocator files mapped by any process on the host, and each process's allocator.
    pub fn all(&mut self) -> (Vec<PathBuf>, HashMap<u32, Allocator>) {
        let mut files = Vec::new();
        let mut allocators = HashMap::new();
        for pid in self.proc_root.pids().unwrap_or_default() {
            let found = self.process(pid);
            files.extend(found.files);
            if let Some(a) = found.allocator {
                allocators.insert(pid, a);
            }
        }
        (files, allocators)
    }

    /// The host's C and C++ runtime libraries from the linker cache: what a process
    /// started later will almost surely map, attached up front so it is seen from its
    /// first allocation (its lifecycle events reach leakmon only once it is traced).
    pub fn host_libraries(&mut self) -> Vec<PathBuf> {
        let runtimes: Vec<PathBuf> = ["libc.so.6", "libstdc++.so.6"]
            .into_iter()
            .filter_map(|name| self.linker_cache().get(name).cloned())
            .collect();
        runtimes.into_iter().filter(|p| self.classify(p).is_some_and(|i| i.probe)).collect()
    }

    /// The allocator files among the libraries `file` needs, directly or through other
    /// libraries, found as the dynamic linker would through its cache: what a program
    /// held at its exec will load before its first instruction.
    pub fn needed_by(&mut self, file: &Path) -> Vec<PathBuf> {
        const MAX_LIBRARIES: usize = 512;
        let cache = self.linker_cache().clone();
        let mut queue: Vec<PathBuf> = vec![file.to_owned()];
        let mut visited: BTreeSet<PathBuf> = BTreeSet::new();
        let mut found = Vec::new();
        while let Some(path) = queue.pop() {
            if visited.len() >= MAX_LIBRARIES || !visited.insert(path.clone()) {
                continue;
            }
            let Some(info) = self.classify(&path) else { continue };
            if info.probe && path != file {
                found.push(path);
            }
            queue.extend(info.needed.iter().filter_map(|name| cache.get(name.as_str()).cloned()));
        }
        found
    }

    /// The files named by an `LD_PRELOAD` value (colon- or space-separated) that carry
    /// allocator entry points: a command started with it allocates through them from
    /// its first instruction.
    pub fn preloaded(&mut self, value: &str) -> Vec<PathBuf> {
        value
            .split([':', ' '])
            .filter(|s| s.starts_with('/'))
            .map(PathBuf::from)
            .filter(|p| self.classify(p).is_some_and(|i| i.probe))
            .collect()
    }
}

fn strip_deleted(path: &Path) -> PathBuf {
    let s = path.to_string_lossy();
    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
}

impl Discovery {
    fn linker_cache(&mut self) -> &HashMap<String, PathBuf> {
        self.linker_cache.get_or_insert_with(linker_cache_names)
    }
}

/// Every library of the dynamic linker's cache by name, for this architecture.
fn linker_cache_names() -> HashMap<String, PathBuf> {
    let Ok(out) = Command::new("ldconfig").arg("-p").output() else { return HashMap::new() };
    let mut names = HashMap::new();
    for path in cache_entries(&String::from_utf8_lossy(&out.stdout)) {
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            names.entry(name.to_owned()).or_insert_with(|| path.clone());
        }
    }
    names
}

fn cache_entries(text: &str) -> Vec<PathBuf> {
    let native = match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        "aarch64" => "AArch64",
        other => other,
    };
    text.lines()
        .filter_map(|line| {
            let (left, path) = line.split_once(" => ")?;
            left.contains(native).then(|| PathBuf::from(path.trim()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn linker_cache_entries_of_this_architecture() {
        let text = "1234 libs found in cache `/etc/ld.so.cache'
\tlibstdc++.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libstdc++.so.6
\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6
\tlibc.so.6 (libc6) => /lib/i386-linux-gnu/libc.so.6
\tlibjemalloc.so.2 (libc6,x86-64) => /lib/x86_64-linux-gnu/libjemalloc.so.2
\tlibcap.so.2 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcap.so.2
";
        assert_eq!(
            cache_entries(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libstdc++.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libcap.so.2"),
            ]
        );
    }

    #[test]
    fn this_process_maps_libc_and_uses_glibc() {
        let mut discovery = Discovery::new(ProcRoot::default());
        let found = discovery.process(std::process::id());
        assert!(found.files.iter().any(|p| p.to_string_lossy().contains("libc.so")), "{found:?}");
        assert!(found.files.iter().all(|p| p.starts_with(format!("/proc/{}/root", std::process::id()))));
        assert_eq!(found.allocator, Some(Allocator::Glibc));
        // The test binary itself defines no allocator: only libraries are probed.
        assert!(!found.files.iter().any(|p| p.to_string_lossy().contains("leakmon")), "{found:?}");
        let cached = discovery.cached_files();
        discovery.process(std::process::id());
        assert_eq!(discovery.cached_files(), cached, "files are classified once");
    }

    #[test]
    fn preload_values_name_files_with_entry_points_only() {
        let mut discovery = Discovery::new(ProcRoot::default());
        let libc = discovery
            .process(std::process::id())
            .files
            .into_iter()
            .find(|p| p.to_string_lossy().contains("libc.so"))
            .expect("libc");
        let value = format!("{} /nonexistent.so relative.so:/etc/hostname", libc.display());
        assert_eq!(discovery.preloaded(&value), vec![libc]);
    }

    #[test]
    fn a_program_needs_libc_through_the_linker_cache() {
        let mut discovery = Discovery::new(ProcRoot::default());
        let needed = discovery.needed_by(Path::new("/usr/bin/env"));
        assert!(needed.iter().any(|p| p.to_string_lossy().contains("libc.so")), "{needed:?}");
        // Only files with allocator entry points.
        assert!(needed.iter().all(|p| !p.to_string_lossy().contains("libcap")), "{needed:?}");
    }

    /// A process tree in a temporary proc root whose maps name `libraries` (real files),
    /// in that order, with `exe` as its executable.
    fn fake_process(exe: &str, libraries: &[&Path]) -> (tempfile::TempDir, ProcRoot) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_dir = dir.path().join("42");
        std::fs::create_dir_all(&pid_dir).expect("mkdir");
        std::os::unix::fs::symlink("/", pid_dir.join("root")).expect("root link");
        std::os::unix::fs::symlink(exe, pid_dir.join("exe")).expect("exe link");
        let mut maps = String::new();
        for (i, lib) in libraries.iter().enumerate() {
            let ino = std::fs::metadata(lib).expect("library installed").ino();
            let _ = writeln!(
                maps,
                "7f{i:02x}00000000-7f{i:02x}00100000 r-xp 00000000 fe:00 {ino} {}",
                lib.display()
            );
        }
        std::fs::write(pid_dir.join("maps"), maps).expect("maps");
        let root = ProcRoot::new(dir.path());
        (dir, root)
    }

    fn libc_path() -> PathBuf {
        Discovery::new(ProcRoot::default())
            .process(std::process::id())
            .files
            .into_iter()
            .find(|p| p.to_string_lossy().contains("libc.so"))
            .expect("libc")
    }

    #[test]
    fn an_interposing_allocator_wins_over_libc_in_any_map_order() {
        // `cargo xtask setup --tests` installs libjemalloc2: missing, it is a failure.
        let jemalloc = Path::new("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2");
        assert!(jemalloc.exists(), "libjemalloc2 is not installed: run `cargo xtask setup --tests`");
        let libc = libc_path();
        for order in [[jemalloc, libc.as_path()], [libc.as_path(), jemalloc]] {
            let (_dir, root) = fake_process("/usr/bin/env", &order);
            let found = Discovery::new(root).process(42);
            assert_eq!(found.allocator, Some(Allocator::Jemalloc), "maps order {order:?}");
            assert_eq!(found.files.len(), 2);
        }
        // With libc alone, libc's.
        let (_dir, root) = fake_process("/usr/bin/env", &[libc.as_path()]);
        assert_eq!(Discovery::new(root).process(42).allocator, Some(Allocator::Glibc));
    }
}
