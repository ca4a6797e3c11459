//! The binaries stacks are named from, held open while their parsed symbols are kept.
//!
//! A target's binaries are its owner's files. Each is opened once, inside the target's
//! root (its symbolic links never leading out of it), without blocking and only if it
//! is a regular file. blazesym maps what it parses, and a mapping of a file that its
//! owner truncates faults (SIGBUS) in root's leakmon; so a binary that anyone but root
//! could change is first copied into a sealed memory file, and blazesym is given that.
//! blazesym reaches each binary by a `/proc/self/fd` path of ours, never by the
//! target's path.

use std::{
    collections::HashMap,
    ffi::CStr,
    fs::File,
    io::{self, Read as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use crate::{
    procfs::Mapping,
    untrusted::{open_beneath, TargetRoot, BINARY_LIMIT},
};

/// The largest binary copied before it is named (one that anyone but root can change).
pub const COPY_LIMIT: u64 = 512 << 20;

/// Bytes of copies kept at most; past this the symbolizer starts its cache over.
pub const COPIED_LIMIT: u64 = 1 << 30;

/// One binary held open.
#[derive(Debug)]
pub struct Binary {
    /// What blazesym opens: our own descriptor's path.
    pub path: PathBuf,
    /// Its GNU build id (hex), when it has one.
    pub build_id: Option<String>,
    _fd: OwnedFd,
}

/// The binaries opened so far, by where a process mapped them.
#[derive(Default)]
pub struct Binaries {
    held: Vec<Binary>,
    /// By the mapping's device, inode and path.
    by_mapping: HashMap<(u32, u32, u64, PathBuf), Option<usize>>,
    /// By the opened file's device and inode: two paths to one file share it.
    by_file: HashMap<(u64, u64), usize>,
    /// Debug files by build id.
    by_build_id: HashMap<String, Option<usize>>,
    copied: u64,
}

impl Binaries {
    /// The binary `mapping` maps; `root` is the process's `/proc/PID/root` while it lives.
    /// `None` when it cannot be opened or is not a regular file.
    pub fn mapped(&mut self, mapping: &Mapping, root: Option<&Path>) -> Option<&Binary> {
        let key = (mapping.dev_major, mapping.dev_minor, mapping.inode, mapping.path.clone());
        let index = match self.by_mapping.get(&key) {
            Some(known) => *known,
            None => {
                let index = open_mapped(mapping, root).ok().and_then(|fd| self.hold(fd));
                self.by_mapping.insert(key, index);
                index
            }
        };
        index.map(|i| &self.held[i])
    }

    /// The separate debug file of the build `id`, where distributions install it.
    pub fn debug_file(&mut self, id: &str, root: Option<&Path>) -> Option<&Binary> {
        let index = match self.by_build_id.get(id) {
            Some(known) => *known,
            None => {
                let index = open_debug(&debug_path(id), root).ok().and_then(|fd| self.hold(fd));
                self.by_build_id.insert(id.to_owned(), index);
                index
            }
        };
        index.map(|i| &self.held[i])
    }

    /// Binaries held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Bytes of copies held.
    pub fn copied(&self) -> u64 {
        self.copied
    }

    fn hold(&mut self, fd: OwnedFd) -> Option<usize> {
        let opened = File::from(fd);
        let meta = opened.metadata().ok()?;
        if !meta.is_file() || meta.len() > BINARY_LIMIT {
            return None;
        }
        let file = (meta.dev(), meta.ino());
        if let Some(&known) = self.by_file.get(&file) {
            return Some(known);
        }
        let copied = !only_root_can_change(&opened, &meta);
        let fd = if copied { sealed_copy(opened.into(), meta.len()).ok()? } else { opened.into() };
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let build_id = blazesym::helper::read_elf_build_id(&path).ok().flatten().map(|id| {
            id.iter().fold(String::new(), |mut hex, b| {
                let _ = std::fmt::Write::write_fmt(&mut hex, format_args!("{b:02x}"));
                hex
            })
        });
        if copied {
            self.copied += meta.len();
        }
        tracing::debug!(dev = meta.dev(), inode = meta.ino(), copied, "binary opened for naming");
        self.held.push(Binary { path, build_id, _fd: fd });
        self.by_file.insert(file, self.held.len() - 1);
        Some(self.held.len() - 1)
    }
}

/// Opens a mapped binary: a deleted one through the kernel's own link to the mapped
/// file, or, once its process is gone, through the descriptor leakmon held for it (see
/// `commands::capture`); otherwise inside the process's root, and once the process is
/// gone at the path it had, with no symbolic link followed (a mapping's path never
/// holds one).
fn open_mapped(mapping: &Mapping, root: Option<&Path>) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_NONBLOCK;
    if root.is_none() && mapping.path.starts_with("/proc/self/fd") {
        return open_link(&mapping.path, flags);
    }
    if let Some(root) = root {
        if mapping.deleted {
            return open_link(&mapping.open_path(root), flags);
        }
        match TargetRoot::at(root).and_then(|r| r.open(&mapping.path, flags)) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            Err(_) => {}
        }
    }
    open_host(&mapping.path, flags | libc::O_NOFOLLOW, libc::RESOLVE_NO_SYMLINKS)
}

/// A debug file: `.build-id` entries are symbolic links, followed inside the root.
fn open_debug(path: &Path, root: Option<&Path>) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_NONBLOCK;
    if let Some(root) = root {
        if let Ok(fd) = TargetRoot::at(root).and_then(|r| r.open_following(path, flags)) {
            return Ok(fd);
        }
    }
    open_host(path, flags, 0)
}

fn open_host(path: &Path, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    let slash = File::open("/")?;
    open_beneath(std::os::fd::AsFd::as_fd(&slash), path.strip_prefix("/").unwrap_or(path), flags, resolve)
}

/// Opens a kernel-made link (`/proc/PID/map_files/…`).
fn open_link(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt as _;
    Ok(std::fs::OpenOptions::new().read(true).custom_flags(flags | libc::O_CLOEXEC).open(path)?.into())
}

/// Where distributions install the debug file of the build `id` (hex).
pub fn debug_path(id: &str) -> PathBuf {
    let (dir, rest) = id.split_at(id.len().min(2));
    Path::new("/usr/lib/debug/.build-id").join(dir).join(format!("{rest}.debug"))
}

/// Whether only root could change (truncate) the file: owned by root, writable by no
/// group or other (an ACL granting anyone else writing shows in the group bits), and
/// not served by FUSE, whose files claim any owner.
fn only_root_can_change(file: &File, meta: &std::fs::Metadata) -> bool {
    use nix::sys::statfs::{fstatfs, FUSE_SUPER_MAGIC};
    let on_fuse = fstatfs(file).map_or(true, |fs| fs.filesystem_type() == FUSE_SUPER_MAGIC);
    meta.uid() == 0 && meta.mode() & 0o022 == 0 && !on_fuse
}

/// The file's bytes in a memory file of ours, sealed so that nobody can shrink it.
fn sealed_copy(fd: OwnedFd, size: u64) -> io::Result<OwnedFd> {
    if size > COPY_LIMIT {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{size} bytes, over {COPY_LIMIT}")));
    }
    const NAME: &CStr = c"leakmon-binary";
    // SAFETY: a valid C string; the descriptor returned is ours.
    let raw = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just made.
    let copy = unsafe { File::from_raw_fd(raw) };
    // The file may change while copied: the bound holds regardless.
    let copied = io::copy(&mut File::from(fd).take(COPY_LIMIT), &mut &copy)?;
    if copied == COPY_LIMIT {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("grew past {COPY_LIMIT} bytes")));
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: a valid descriptor of ours.
    if unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(copy.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mapping(path: &Path) -> Mapping {
        Mapping {
            start: 0x1000,
            end: 0x2000,
            offset: 0,
            executable: true,
            dev_major: 0,
            dev_minor: 0,
            inode: 0,
            path: path.to_owned(),
            deleted: false,
        }
    }

    #[test]
    fn only_a_file_root_alone_can_change_is_read_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lib.so");
        std::fs::copy("/usr/bin/true", &file).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut held = Binaries::default();
        let binary = held.mapped(&mapping(&file), None).expect("opened");
        assert!(binary.build_id.is_some(), "no build id read through {}", binary.path.display());
        assert_eq!(held.copied(), 0, "root's 0755 file is copied");
        let size = std::fs::metadata(&file).unwrap().len();

        for (copies, (name, uid, mode)) in
            [("nobodys.so", 65534, 0o755), ("group_writable.so", 0, 0o775)].into_iter().enumerate()
        {
            let other = dir.path().join(name);
            std::fs::copy("/usr/bin/true", &other).unwrap();
            std::os::unix::fs::chown(&other, Some(uid), None).unwrap();
            std::fs::set_permissions(&other, std::fs::Permissions::from_mode(mode)).unwrap();
            let binary = held.mapped(&mapping(&other), None).expect("opened");
            assert!(binary.build_id.is_some(), "the copy of {name} has no build id");
            assert_eq!(held.copied(), (copies as u64 + 1) * size, "{name} is read in place");
        }
    }

    #[test]
    fn two_paths_to_one_file_share_one_binary() {
        let dir = tempfile::tempdir().unwrap();
        let (file, link) = (dir.path().join("a.so"), dir.path().join("b.so"));
        std::fs::copy("/usr/bin/true", &file).unwrap();
        std::fs::hard_link(&file, &link).unwrap();
        let mut held = Binaries::default();
        let first = held.mapped(&mapping(&file), None).unwrap().path.clone();
        assert_eq!(held.mapped(&mapping(&link), None).unwrap().path, first);
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn a_fifo_or_a_link_where_a_binary_was_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.so");
        let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
        let link = dir.path().join("link.so");
        std::os::unix::fs::symlink("/usr/bin/true", &link).unwrap();
        let mut held = Binaries::default();
        // A FIFO would block an open without O_NONBLOCK for good.
        assert!(held.mapped(&mapping(&fifo), None).is_none());
        assert!(held.mapped(&mapping(&link), None).is_none(), "a mapping's path never holds a link");
        assert!(held.is_empty());
    }

    #[test]
    fn a_link_in_a_targets_root_never_leads_out_of_it() {
        // The target's root is `root`; its /usr/lib/libc.so.6 is a link to an absolute
        // path, which must resolve inside `root`, not in leakmon's own root.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/true", root.path().join("usr/lib/libc.so.6")).unwrap();
        std::os::unix::fs::symlink("/usr/bin", root.path().join("bin")).unwrap();
        let mut held = Binaries::default();
        let in_root = |p: &str| Mapping { path: PathBuf::from(p), ..mapping(Path::new("/")) };
        assert!(held.mapped(&in_root("/usr/lib/libc.so.6"), Some(root.path())).is_none());
        // /bin leads to the root's own /usr/bin, which holds no `true`; leakmon's own
        // /bin/true is not reached through a link either.
        assert!(held.mapped(&in_root("/bin/true"), Some(root.path())).is_none());
        assert!(held.is_empty());
    }
}
