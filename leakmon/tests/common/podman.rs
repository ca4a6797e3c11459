//! Real containers for the tests: podman with the runc runtime (Debian's packages),
//! images built here from files on this machine (`podman import` of a root file
//! system), never pulled from a registry. Limits are lowered, never raised (raising is
//! refused here), and each container runs under podman's default seccomp profile
//! unless a test gives its own.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// An image holding `files` (host paths, each put at the same path inside; a
/// directory with what it holds, but its tests and byte-code caches) and the C library
/// with its loader; its name is made from what it holds, so it is built once.
pub fn image(files: &[PathBuf]) -> String {
    let mut all: Vec<PathBuf> = Vec::new();
    for f in files {
        walk(f, &mut all);
    }
    all.extend(["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"].map(PathBuf::from));
    // Small files by their bytes, large ones (a runtime's) by their size and time.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for f in &all {
        let meta = std::fs::metadata(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let bytes = if meta.len() < 1 << 20 {
            std::fs::read(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()))
        } else {
            let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            format!("{} {modified:?}", meta.len()).into_bytes()
        };
        for b in f.as_os_str().as_encoded_bytes().iter().chain(&bytes) {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let name = format!("localhost/leakmon-test:{hash:016x}");
    let exists = Command::new("podman").args(["image", "exists", &name]).status().expect("run podman");
    if exists.success() {
        return name;
    }
    let root = tempfile::tempdir().expect("temp dir");
    for f in &all {
        let inside = root.path().join(f.strip_prefix("/").expect("an absolute path"));
        std::fs::create_dir_all(inside.parent().expect("a parent")).expect("make the image's directories");
        std::fs::copy(std::fs::canonicalize(f).expect("resolve"), &inside).expect("copy into the image");
    }
    std::fs::create_dir_all(root.path().join("tmp")).expect("tmp");
    let tar = root.path().with_extension("tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(status.success(), "tar the image's root");
    let out = Command::new("podman").arg("import").arg(&tar).arg(&name).output().expect("run podman import");
    let _ = std::fs::remove_file(&tar);
    assert!(out.status.success(), "podman import: {}", String::from_utf8_lossy(&out.stderr));
    name
}

fn walk(path: &Path, into: &mut Vec<PathBuf>) {
    if !path.is_dir() {
        into.push(path.to_owned());
        return;
    }
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(path).expect("read a directory").flatten().map(|e| e.path()).collect();
    entries.sort();
    for e in entries {
        let name = e.file_name().unwrap_or_default();
        // A link is taken as what it leads to (Debian's JDK links its configuration
        // from /etc); one that leads nowhere is left out.
        if name != "test" && name != "__pycache__" && e.exists() {
            walk(&e, into);
        }
    }
}

/// Debian's python3.11 with its standard library and the libraries it links.
pub fn python_files() -> Vec<PathBuf> {
    [
        "/usr/bin/python3.11",
        "/usr/lib/python3.11",
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/x86_64-linux-gnu/libexpat.so.1",
    ]
    .map(PathBuf::from)
    .to_vec()
}

/// Node.js (its one binary) and the libraries it links.
pub fn node_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/usr/bin/node")];
    let out = Command::new("ldd").arg("/usr/bin/node").output().expect("run ldd");
    files.extend(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split("=> ").nth(1)?.split(' ').next().map(PathBuf::from))
            .filter(|p| p.is_absolute()),
    );
    files
}

/// OpenJDK 17's runtime (its `java`, libraries and configuration) and what it links.
pub fn jvm_files() -> Vec<PathBuf> {
    let home = Path::new("/usr/lib/jvm/java-17-openjdk-amd64");
    let mut files: Vec<PathBuf> =
        ["bin/java", "lib", "conf", "release"].iter().map(|p| home.join(p)).collect();
    files.extend(
        [
            "libz.so.1",
            "libstdc++.so.6",
            "libgcc_s.so.1",
            "libm.so.6",
            "libdl.so.2",
            "libpthread.so.0",
            "librt.so.1",
        ]
        .iter()
        .map(|l| Path::new("/lib/x86_64-linux-gnu").join(l)),
    );
    files
}

/// A running container, removed when dropped.
pub struct Container {
    pub name: String,
    /// Its process, as the host numbers it.
    pub pid: u32,
}

impl Container {
    /// Runs `command` in a container of `image`, detached; `options` go to `podman run`
    /// (a seccomp profile of the test's own).
    pub fn run(name: &str, image: &str, options: &[&str], command: &[&str]) -> Self {
        let _ = Command::new("podman").args(["rm", "-f", name]).output();
        let out = Command::new("podman")
            .args(["run", "-d", "--runtime", "runc", "--name", name])
            .args(["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096", "--network", "none"])
            .args(options)
            .arg(image)
            .args(command)
            .output()
            .expect("run podman");
        assert!(out.status.success(), "podman run: {}", String::from_utf8_lossy(&out.stderr));
        let mut container = Self { name: name.to_owned(), pid: 0 };
        container.pid = container.inspect("{{.State.Pid}}").parse().expect("a pid");
        container
    }

    pub fn inspect(&self, format: &str) -> String {
        let out = Command::new("podman")
            .args(["inspect", "--format", format, &self.name])
            .output()
            .expect("run podman inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Its full id.
    pub fn id(&self) -> String {
        self.inspect("{{.Id}}")
    }

    /// What it wrote to its standard output and error so far.
    pub fn logs(&self) -> String {
        let out = Command::new("podman").args(["logs", &self.name]).output().expect("run podman logs");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    /// Waits up to 10 s for its log to hold `count` lines equal to `line`.
    pub fn wait_for(&self, line: &str, count: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.lines().filter(|l| *l == line).count() >= count {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: waiting for {count} × {line:?}:\n{logs}",
                self.name
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "-f", "-t", "0", &self.name]).output();
    }
}

/// A seccomp profile for podman in `dir`: everything allowed but `mmap` of memory
/// both writable and executable, refused (EPERM), as a hardened service's may be.
pub fn profile_without_wx_mmap(dir: &Path) -> PathBuf {
    let path = dir.join("no-wx-mmap.json");
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{
            "names": ["mmap"],
            "action": "SCMP_ACT_ERRNO",
            "args": [{"index": 2, "value": 6, "valueTwo": 6, "op": "SCMP_CMP_MASKED_EQ"}]
        }]
    });
    std::fs::write(&path, profile.to_string()).expect("write the profile");
    path
}
