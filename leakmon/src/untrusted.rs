//! What a target process controls, reached so that it cannot turn leakmon's
//! privileges against anyone.
//!
//! leakmon runs as root; a target's working directory, its /tmp, its root, its files and
//! its /proc entries belong to whoever runs the target. So: paths inside a target are
//! resolved inside its root and never out of it (`openat2` with `RESOLVE_IN_ROOT`),
//! files leakmon leaves there are created new (`O_EXCL | O_NOFOLLOW`) with the
//! target's own file-system identity, removed only if they are still the file leakmon
//! made, and read with a bound on their size; /proc text is read as bytes (a process
//! names itself with any bytes it likes); a signal goes only to the process that was
//! checked (a pidfd pins it) and only when it catches that signal.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read as _},
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{MetadataExt as _, OpenOptionsExt as _},
        },
    },
    path::Path,
};

/// The largest /proc text leakmon reads (a maps file of 65,530 mappings is about 7 MiB).
pub const PROC_TEXT_LIMIT: u64 = 64 << 20;

/// Reads a /proc file (or any kernel text) of at most `limit` bytes, any bytes taken
/// as text (invalid UTF-8 replaced).
pub fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    let file = File::open(path)?;
    let mut out = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is over {limit} bytes", path.display()),
        ));
    }
    Ok(match String::from_utf8(out) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Reads a regular file a target controls, refusing anything else (a device, a FIFO)
/// and anything larger than `limit`.
pub fn read_regular(file: File, limit: u64, what: &str) -> io::Result<Vec<u8>> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what} is not a regular file")));
    }
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} is {} bytes, over the {limit} leakmon reads", meta.len()),
        ));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    // The file may grow while read: the bound holds regardless.
    file.take(limit.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what} grew past {limit} bytes")));
    }
    Ok(out)
}

/// The largest binary (executable or library) leakmon reads to find its allocator
/// functions or unwind tables.
pub const BINARY_LIMIT: u64 = 2 << 30;

/// Reads a target's binary into memory: a copy, not a mapping, since a mapping of a file
/// its owner truncates meanwhile faults (SIGBUS) in root's leakmon. A FIFO, a device or
/// anything else that is not a regular file is refused; a binary over [`BINARY_LIMIT`]
/// too.
///
/// A path through a process's root (`/proc/PID/root/…`) is resolved inside that root,
/// as the process would resolve it: a link there never leads to leakmon's own files.
pub fn read_binary(path: &Path) -> io::Result<Vec<u8>> {
    let flags = libc::O_RDONLY | libc::O_NONBLOCK;
    let file = match in_target_root(path) {
        // Links are followed, inside the root: a preloaded library is named by its
        // soname's link.
        Some((root, inside)) => File::from(TargetRoot::at(&root)?.open_following(inside, flags)?),
        None => std::fs::OpenOptions::new().read(true).custom_flags(flags | libc::O_CLOEXEC).open(path)?,
    };
    read_regular(file, BINARY_LIMIT, &path.display().to_string())
}

/// `/proc/PID/root/rest` as (`/proc/PID/root`, `/rest`).
fn in_target_root(path: &Path) -> Option<(std::path::PathBuf, &Path)> {
    let mut parts = path.components();
    let (Some(std::path::Component::RootDir), Some(proc), Some(pid), Some(root)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let numeric =
        pid.as_os_str().to_str().is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (proc.as_os_str() == "proc" && numeric && root.as_os_str() == "root")
        .then(|| (Path::new("/proc").join(pid).join("root"), parts.as_path()))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A target's root directory (`/proc/PID/root`), held open: every path under it is
/// resolved as the target would resolve it, its symbolic links never leading out.
pub struct TargetRoot {
    fd: OwnedFd,
}

impl TargetRoot {
    pub fn of(proc_root: &Path, pid: u32) -> io::Result<Self> {
        Ok(Self { fd: proc_dir(proc_root, pid, "root")? })
    }

    /// The root a `/proc/PID/root` path names.
    pub fn at(root: &Path) -> io::Result<Self> {
        Ok(Self { fd: open_dir(root)? })
    }

    /// Opens `path` (absolute in the target's view) with `flags`, resolved inside the
    /// target's root; the last component is never a symbolic link.
    pub fn open(&self, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
        let relative = path.strip_prefix("/").unwrap_or(path);
        open_beneath(self.fd.as_fd(), relative, flags | libc::O_NOFOLLOW, libc::RESOLVE_IN_ROOT)
    }

    /// [`TargetRoot::open`], following a last component that is a symbolic link (still
    /// inside the root).
    pub fn open_following(&self, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
        let relative = path.strip_prefix("/").unwrap_or(path);
        open_beneath(self.fd.as_fd(), relative, flags, libc::RESOLVE_IN_ROOT)
    }

    /// Opens a directory inside the target's root.
    pub fn dir(&self, path: &Path) -> io::Result<OwnedFd> {
        self.open(path, libc::O_PATH | libc::O_DIRECTORY)
    }

    /// A directory inside the target's root, held open, and the names in it (those
    /// that are UTF-8), at most `limit` of them.
    pub fn names(&self, path: &Path, limit: usize) -> io::Result<(OwnedFd, Vec<String>)> {
        let dir = self.dir(path)?;
        let names = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .take(limit)
            .collect();
        Ok((dir, names))
    }

    /// Reads a regular file inside the target's root, at most `limit` bytes.
    pub fn read(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let fd = self.open(path, libc::O_RDONLY | libc::O_NONBLOCK)?;
        read_regular(File::from(fd), limit, &path.display().to_string())
    }
}

/// A target's working directory, held open (`/proc/PID/cwd`).
pub fn cwd_of(proc_root: &Path, pid: u32) -> io::Result<OwnedFd> {
    proc_dir(proc_root, pid, "cwd")
}

/// The directory a `/proc/PID` link (`root`, `cwd`) names, opened through it.
fn proc_dir(proc_root: &Path, pid: u32, link: &str) -> io::Result<OwnedFd> {
    open_dir(&proc_root.join(pid.to_string()).join(link))
}

/// A directory held open by an `O_PATH` descriptor.
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    // SAFETY: a valid C string; the descriptor returned is ours.
    let fd = check(
        unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) }.into(),
    )?;
    // SAFETY: a descriptor just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `openat2(dir, path, flags, resolve | RESOLVE_NO_MAGICLINKS)`, close-on-exec.
pub fn open_beneath(dir: BorrowedFd, path: &Path, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    // SAFETY: open_how is plain data; zeroed is its "nothing asked" state.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid pointers for the call's duration; the descriptor returned is ours.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<libc::open_how>(),
        )
    })?;
    // SAFETY: a descriptor just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A user and group to act as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    /// The effective user and group of `pid`, from its status.
    pub fn of(proc_root: &Path, pid: u32) -> io::Result<Self> {
        let status = read_text(&proc_root.join(pid.to_string()).join("status"), PROC_TEXT_LIMIT)?;
        let field = |key: &str| -> io::Result<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("no {key} line in the status of {pid}"),
                    )
                })
        };
        Ok(Self { uid: field("Uid:")?, gid: field("Gid:")? })
    }
}

/// Creates `name` in `dir`, new (never an existing file, never through a link), as
/// `who` would: the kernel checks `who`'s rights to the directory, not root's, and the
/// file is `who`'s from the start. Done on a thread of its own, whose file-system
/// identity (per thread, `setfsuid`) ends with it.
pub fn create_as(dir: BorrowedFd, name: &str, who: Identity, mode: u32) -> io::Result<File> {
    if name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a file name with a slash"));
    }
    let name = c_path(Path::new(name))?;
    let dir = dir.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| -> io::Result<File> {
            // SAFETY: these change only this thread's credentials (the raw calls, not
            // glibc's wrappers that apply set*id to every thread); it ends right after.
            unsafe {
                check(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()))?;
                libc::syscall(libc::SYS_setfsgid, who.gid);
                libc::syscall(libc::SYS_setfsuid, who.uid);
                // setfs*id return the previous id, never an error: check the result.
                if libc::syscall(libc::SYS_setfsuid, u32::MAX) != libc::c_long::from(who.uid)
                    || libc::syscall(libc::SYS_setfsgid, u32::MAX) != libc::c_long::from(who.gid)
                {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "could not take the target's identity",
                    ));
                }
            }
            // SAFETY: a valid C string and directory descriptor; the descriptor is ours.
            let fd = check(
                unsafe {
                    libc::openat(
                        dir,
                        name.as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                        mode,
                    )
                }
                .into(),
            )?;
            // SAFETY: a descriptor just opened.
            Ok(unsafe { File::from_raw_fd(fd as i32) })
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread creating a file panicked")))
    })
}

/// Removes `name` from `dir` if it is still `file` (same device and inode): a target
/// that replaced it keeps what it put there.
pub fn remove_if_same(dir: BorrowedFd, name: &str, file: &File) -> io::Result<()> {
    let ours = file.metadata()?;
    if same_file(dir, name, ours.dev(), ours.ino())? {
        unlink(dir, name)
    } else {
        Ok(())
    }
}

/// Removes `name` from `dir` if it is a regular file owned by `owner` (a file the
/// target wrote at leakmon's request), never following a link.
pub fn remove_owned(dir: BorrowedFd, name: &str, owner: u32) -> io::Result<()> {
    match stat_at(dir, name)? {
        Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_uid == owner => unlink(dir, name),
        _ => Ok(()),
    }
}

fn stat_at(dir: BorrowedFd, name: &str) -> io::Result<Option<libc::stat>> {
    let c = c_path(Path::new(name))?;
    // SAFETY: stat is plain data, filled by the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the call's duration.
    let ret = unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &raw mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound { Ok(None) } else { Err(e) };
    }
    Ok(Some(st))
}

fn same_file(dir: BorrowedFd, name: &str, dev: u64, ino: u64) -> io::Result<bool> {
    Ok(stat_at(dir, name)?.is_some_and(|st| st.st_dev == dev && st.st_ino == ino))
}

fn unlink(dir: BorrowedFd, name: &str) -> io::Result<()> {
    let c = c_path(Path::new(name))?;
    // SAFETY: a valid C string and directory descriptor.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }.into()).map(drop)
}

/// A process pinned by a pidfd: a signal sent through it reaches that process or
/// none, never one that took its pid since.
pub struct Pinned {
    pid: u32,
    fd: OwnedFd,
}

impl Pinned {
    pub fn open(pid: u32) -> io::Result<Self> {
        // SAFETY: no pointers; the descriptor returned is ours.
        let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
        // SAFETY: a descriptor just opened.
        Ok(Self { pid, fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process catches `signal` (a handler of its own, per `SigCgt`):
    /// one that does not would take the signal's default action, often its end.
    pub fn catches(&self, proc_root: &Path, signal: libc::c_int) -> io::Result<bool> {
        let status = read_text(&proc_root.join(self.pid.to_string()).join("status"), PROC_TEXT_LIMIT)?;
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        // The status read above may be a new process's if the pid was reused: the
        // pidfd says whether ours is still the one there.
        self.alive()?;
        Ok(caught & (1 << (signal - 1)) != 0)
    }

    /// Fails with ESRCH once the process is gone.
    pub fn alive(&self) -> io::Result<()> {
        // SAFETY: signal 0 checks only; no pointers.
        check(unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), 0, std::ptr::null::<u8>(), 0)
        })
        .map(drop)
    }

    /// Sends `signal` to the pinned process only.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: no pointers beyond a null siginfo.
        check(unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), signal, std::ptr::null::<u8>(), 0)
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_with_invalid_utf8_is_read_with_replacements() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status");
        std::fs::write(&path, b"Name:\tbad\xff\xfename\nUid:\t1\t2\t3\t4\n").unwrap();
        let text = read_text(&path, 1024).unwrap();
        assert!(text.starts_with("Name:\tbad\u{fffd}\u{fffd}name\n"), "{text:?}");
        assert!(read_text(&path, 8).is_err(), "over the bound");
    }

    #[test]
    fn a_regular_file_is_read_within_its_bound_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, [7u8; 100]).unwrap();
        assert_eq!(read_regular(File::open(&path).unwrap(), 100, "data").unwrap().len(), 100);
        assert!(read_regular(File::open(&path).unwrap(), 99, "data").is_err());
        assert!(read_regular(File::open("/dev/zero").unwrap(), 1 << 20, "zero").is_err());
    }

    #[test]
    fn a_path_in_a_root_never_leads_out_of_it() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("tmp")).unwrap();
        std::fs::write(root.path().join("tmp/own"), "own").unwrap();
        // An absolute link, and a link of the last component.
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("tmp/link")).unwrap();
        let dir = File::open(root.path()).unwrap();
        let target = TargetRoot { fd: dir.into() };
        assert_eq!(target.read(Path::new("/tmp/own"), 16).unwrap(), b"own");
        assert!(target.read(Path::new("/out/secret"), 16).is_err(), "resolved inside the root: no such file");
        assert!(target.read(Path::new("/tmp/link"), 16).is_err(), "a link as the last component");
        assert!(target.read(Path::new("/tmp/../../../../etc/passwd"), 1 << 20).is_err());
    }

    /// A binary read through a process's `/proc/PID/root` is looked up inside that root:
    /// an absolute link there names the root's own file, never leakmon's.
    #[test]
    fn a_binary_read_through_a_process_root_stays_inside_it() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib")).unwrap();
        std::fs::write(root.path().join("usr/lib/own.so"), b"own").unwrap();
        std::os::unix::fs::symlink("/usr/bin", root.path().join("usr/lib/out")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/own.so", root.path().join("usr/lib/own.so.1")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/true", root.path().join("usr/lib/true.so")).unwrap();
        // A process whose root is `root`: forked, it only chroots and waits.
        let c_root = std::ffi::CString::new(root.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: the child calls only async-signal-safe functions, then _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                if libc::chroot(c_root.as_ptr()) == 0 {
                    libc::pause();
                }
                libc::_exit(1);
            }
        }
        let through = Path::new("/proc").join(child.to_string()).join("root");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(&through).ok().as_deref() != Some(root.path()) {
            assert!(std::time::Instant::now() < deadline, "the child never chrooted");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let own = read_binary(&through.join("usr/lib/own.so"));
        let own_link = read_binary(&through.join("usr/lib/own.so.1"));
        let out = read_binary(&through.join("usr/lib/out/true"));
        let out_link = read_binary(&through.join("usr/lib/true.so"));
        // SAFETY: our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        assert_eq!(own.unwrap(), b"own");
        assert_eq!(own_link.unwrap(), b"own", "a link inside the root is followed there");
        assert!(out.is_err(), "a link in the root led to leakmon's /usr/bin/true");
        assert!(out_link.is_err(), "a last link in the root led to leakmon's /usr/bin/true");
        assert!(in_target_root(Path::new("/proc/self/root/x")).is_none());
        assert!(in_target_root(Path::new("/usr/lib/x")).is_none());
    }

    #[test]
    fn a_file_is_created_new_as_its_owner_and_removed_only_while_it_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        let handle = File::open(dir.path()).unwrap();
        let who = Identity { uid: 65534, gid: 65534 };
        // root's directory, mode 0700: nobody may not create there.
        let refused = create_as(handle.as_fd(), "trigger", who, 0o600);
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let file = create_as(handle.as_fd(), "trigger", who, 0o600).unwrap();
        let meta = std::fs::symlink_metadata(dir.path().join("trigger")).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (65534, 65534, 0o600));
        assert!(create_as(handle.as_fd(), "trigger", who, 0o600).is_err(), "never an existing file");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        assert!(create_as(handle.as_fd(), "link", who, 0o600).is_err(), "never through a link");
        // Replaced: left alone.
        std::fs::remove_file(dir.path().join("trigger")).unwrap();
        std::fs::write(dir.path().join("trigger"), "theirs").unwrap();
        remove_if_same(handle.as_fd(), "trigger", &file).unwrap();
        assert!(dir.path().join("trigger").exists());
        std::fs::remove_file(dir.path().join("trigger")).unwrap();
        let file = create_as(handle.as_fd(), "trigger", who, 0o600).unwrap();
        remove_if_same(handle.as_fd(), "trigger", &file).unwrap();
        assert!(!dir.path().join("trigger").exists());
        // This thread is still root.
        // SAFETY: no arguments.
        assert_eq!(unsafe { libc::geteuid() }, 0);
        std::fs::write(dir.path().join("root-owned"), "x").unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("root-owned")).unwrap().uid(), 0);
    }

    #[test]
    fn a_pinned_process_is_signalled_only_while_it_lives() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pinned = Pinned::open(child.id()).unwrap();
        pinned.alive().unwrap();
        assert!(!pinned.catches(Path::new("/proc"), libc::SIGUSR1).unwrap(), "sleep catches no SIGUSR1");
        pinned.signal(libc::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(pinned.alive().is_err(), "gone once reaped");
    }
}
