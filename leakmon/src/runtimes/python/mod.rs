//! CPython processes: the layout the kernel needs to walk their frames
//! ([`Interpreter::find`]), and the names of the frames it found ([`Process`]).
//!
//! In: a process's mappings. The interpreter is the file among them that defines
//! `_PyRuntime` (the executable, or libpython); its version is its `Py_Version`.
//! 3.13 describes itself in `_Py_DebugOffsets` at the start of `_PyRuntime`; 3.11 and
//! 3.12 get the tables below (measured with `offsetof` on their headers; the test
//! `layouts_match_the_installed_headers` compares them again). Other versions get
//! native frames and one log line.
//!
//! Out: a [`PyLayout`] for the kernel, and for userspace what naming a code object
//! needs. Every code object is checked (its type must be the interpreter's
//! `PyCode_Type`) before a frame is named from it, so a layout that does not fit costs
//! Python frames, never invents them.

pub mod code;
pub mod frames;
pub mod heap;
pub mod holders;
pub mod lines;
pub mod walk;

use std::path::{Path, PathBuf};

use leakmon_common::python::{PyLayout, NONE};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};

use crate::procfs::Mapping;

/// The runtime's name in reports, frames and series.
pub const NAME: &str = "python";

/// CPython: its frames are walked in the kernel (see `leakmon-ebpf`'s python.rs) and
/// named by [`frames`]; it has no heap profiler leakmon asks.
pub struct PythonSupport;

pub static PYTHON: PythonSupport = PythonSupport;

impl super::Support for PythonSupport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn title(&self) -> &'static str {
        "CPython"
    }

    fn mapped_in(&self, maps: &[Mapping]) -> bool {
        runs(maps)
    }

    fn note(&self, method: crate::model::Method) -> Option<&'static str> {
        (method == crate::model::Method::Uprobes).then_some(UNSEEN_BY_UPROBES)
    }

    fn interpreter_under_site(&self) -> bool {
        true
    }

    fn reused_kind(&self, native: &[&str]) -> Option<&'static str> {
        // The interpreter's constructors (under the first frame of Python code): the
        // object kinds CPython (3.11 to 3.13) keeps free lists of.
        native.iter().find_map(|f| {
            FREE_LISTS.iter().find(|(constructors, _)| constructors.contains(f)).map(|(_, kind)| *kind)
        })
    }

    fn walked(&self) -> Option<&dyn super::Walked> {
        Some(self)
    }
}

/// The constructors of the objects CPython keeps free lists of, and their kinds: a
/// tuple, list, dict or float dropped goes onto its type's list and is handed out
/// again with no call to the allocator, so the agent hears of neither.
const FREE_LISTS: &[(&[&str], &str)] = &[
    (&["PyTuple_New", "tuple_alloc", "_PyTuple_FromArray", "_PyTuple_FromArraySteal"], "tuples"),
    (&["PyList_New", "list_new_prealloc", "_PyList_FromArraySteal"], "lists"),
    (&["PyDict_New", "new_dict", "_PyDict_NewPresized", "_PyDict_FromItems"], "dicts"),
    (&["PyFloat_FromDouble", "_PyFloat_FromDouble"], "floats"),
];

/// Said of a CPython process watched through uprobes.
pub const UNSEEN_BY_UPROBES: &str =
    "small Python objects come from CPython's own arenas (pymalloc), which uprobes do not see: add --agent to sample them";

/// Whether `maps` run CPython (an executable mapping of its executable or library).
pub fn runs(maps: &[Mapping]) -> bool {
    maps.iter().any(|m| m.executable && is_interpreter_file(&m.path))
}

/// Where a code object and a string keep what naming a frame needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Objects {
    pub code_qualname: u64,
    pub code_filename: u64,
    pub code_firstlineno: u64,
    pub code_linetable: u64,
    /// `sizeof(PyASCIIObject)`: where an ASCII string's characters start.
    pub ascii_size: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact strings' start.
    pub compact_size: u64,
    pub unicode_length: u64,
    pub unicode_state: u64,
}

/// One CPython found in a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interpreter {
    /// Major, minor, micro.
    pub version: (u32, u32, u32),
    /// The file defining `_PyRuntime`, as the process names it.
    pub path: PathBuf,
    /// Its inode, to tell whether a later look at the process sees the same one.
    pub inode: u64,
    pub layout: PyLayout,
    /// Runtime address of `PyCode_Type`.
    pub code_type: u64,
    pub objects: Objects,
    /// What a walk of its objects reads ([`holders`]).
    pub heap: heap::HeapLayout,
    pub types: heap::Types,
}

/// Why a process's Python gets native frames only.
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    #[error("Python {0}.{1} is not one whose frames leakmon walks (3.11 to 3.13)")]
    Version(u32, u32),
    #[error("{path}: {why}")]
    Binary { path: PathBuf, why: String },
}

impl Interpreter {
    /// The CPython among `maps` (paths opened through `root`, the process's
    /// `/proc/PID/root`): `None` when there is none.
    pub fn find(maps: &[Mapping], root: &Path) -> Option<Result<Self, Unsupported>> {
        let mut seen = std::collections::HashSet::new();
        for m in maps.iter().filter(|m| m.executable && m.inode != 0) {
            if !is_interpreter_file(&m.path) || !seen.insert(m.inode) {
                continue;
            }
            let path = m.open_path(root);
            let Ok(data) = crate::untrusted::read_binary(&path) else { continue };
            let Ok(file) = object::File::parse(&*data) else { continue };
            let Some(runtime) = symbol(&file, "_PyRuntime") else { continue };
            return Some(Self::of_file(&file, m, maps, runtime));
        }
        None
    }

    fn of_file(
        file: &object::File<'_>,
        m: &Mapping,
        maps: &[Mapping],
        runtime: u64,
    ) -> Result<Self, Unsupported> {
        let bad = |why: &str| Unsupported::Binary { path: m.path.clone(), why: why.to_owned() };
        let Some(version) = symbol(file, "Py_Version")
            .and_then(|at| bytes_at(file, at, 4))
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        else {
            // Before 3.11 there is no Py_Version; the file's name says which it is.
            return Err(version_in_name(&m.path).map_or_else(
                || bad("no Py_Version: a CPython before 3.11"),
                |(major, minor)| Unsupported::Version(major, minor),
            ));
        };
        let (major, minor, micro) = (version >> 24, (version >> 16) & 0xff, (version >> 8) & 0xff);
        let bias = load_bias(file, m, maps).ok_or_else(|| bad("its mappings do not match its segments"))?;
        let code_type = symbol(file, "PyCode_Type").ok_or_else(|| bad("no PyCode_Type"))? + bias;
        let ((layout, objects), heap) = match (major, minor) {
            (3, 11) => (v3_11(), heap::HeapLayout::v3_11()),
            (3, 12) => (v3_12(), heap::HeapLayout::v3_12()),
            (3, 13) => {
                let offsets =
                    bytes_at(file, runtime, DEBUG_OFFSETS_SIZE).ok_or_else(|| bad("no _Py_DebugOffsets"))?;
                let not_3_13 = || bad("_Py_DebugOffsets is not 3.13's");
                let modules = modules_in_debug_offsets(offsets).ok_or_else(not_3_13)?;
                (debug_offsets(offsets).ok_or_else(not_3_13)?, heap::HeapLayout::v3_13(modules))
            }
            (major, minor) => return Err(Unsupported::Version(major, minor)),
        };
        let types =
            heap::Types::of_file(file, bias).ok_or_else(|| bad("its built-in types are not exported"))?;
        let layout = PyLayout { interpreters_head: runtime + bias + layout.interpreters_head, ..layout };
        Ok(Self {
            version: (major, minor, micro),
            path: m.path.clone(),
            inode: m.inode,
            layout,
            code_type,
            objects,
            heap,
            types,
        })
    }

    /// Whether `maps` still hold this interpreter (the same file).
    pub fn still_in(&self, maps: &[Mapping]) -> bool {
        maps.iter().any(|m| m.executable && m.inode == self.inode && m.path == self.path)
    }
}

/// Whether `path` names a CPython executable or library (`python*`, `libpython*`).
pub fn is_interpreter_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        n.starts_with("python") || n.starts_with("libpython")
    })
}

/// `(3, 10)` of `libpython3.10.so.1.0` or `python3.10`.
fn version_in_name(path: &Path) -> Option<(u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let rest = &name[name.find("python")? + "python".len()..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn symbol(file: &object::File<'_>, name: &str) -> Option<u64> {
    file.dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.is_definition() && s.name() == Ok(name))
        .map(|s| s.address())
}

/// `len` bytes of the file's initialized data at the virtual address `at`.
fn bytes_at<'a>(file: &object::File<'a>, at: u64, len: usize) -> Option<&'a [u8]> {
    let section = file.sections().find(|s| s.address() <= at && at < s.address() + s.size())?;
    let data = section.data().ok()?;
    data.get(usize::try_from(at - section.address()).ok()?..)?.get(..len)
}

/// Runtime address minus file virtual address, from the mapping of the file's first
/// segment.
fn load_bias(file: &object::File<'_>, m: &Mapping, maps: &[Mapping]) -> Option<u64> {
    let first = file.segments().next()?;
    let (offset, _) = first.file_range();
    let mapped = maps.iter().find(|x| x.inode == m.inode && x.path == m.path && x.offset == offset)?;
    Some(mapped.start.wrapping_sub(first.address()))
}

/// 3.11 (3.11.2 and 3.11.7 measured alike), offsets relative to `_PyRuntime` for the
/// interpreters' head.
fn v3_11() -> (PyLayout, Objects) {
    (
        PyLayout {
            interpreters_head: 40,
            interp_threads_head: 16,
            tstate_next: 8,
            tstate_native_thread_id: 160,
            tstate_frame: 56,
            cframe_current_frame: 8,
            frame_previous: 48,
            frame_code: 32,
            frame_instr: 56,
            frame_owner: 69,
            frame_is_entry: 68,
            code_instructions: 184,
            _pad: 0,
            pidns_dev: 0,
            pidns_ino: 0,
        },
        Objects {
            code_qualname: 128,
            code_filename: 112,
            code_firstlineno: 72,
            code_linetable: 136,
            ascii_size: 48,
            compact_size: 72,
            unicode_length: 16,
            unicode_state: 32,
        },
    )
}

/// 3.12 (3.12.1 measured).
fn v3_12() -> (PyLayout, Objects) {
    (
        PyLayout {
            interpreters_head: 40,
            interp_threads_head: 72,
            tstate_next: 8,
            tstate_native_thread_id: 144,
            tstate_frame: 56,
            cframe_current_frame: 0,
            frame_previous: 8,
            frame_code: 0,
            frame_instr: 56,
            frame_owner: 70,
            frame_is_entry: NONE,
            code_instructions: 192,
            _pad: 0,
            pidns_dev: 0,
            pidns_ino: 0,
        },
        Objects {
            code_qualname: 128,
            code_filename: 112,
            code_firstlineno: 68,
            code_linetable: 136,
            ascii_size: 40,
            compact_size: 56,
            unicode_length: 16,
            unicode_state: 32,
        },
    )
}

/// Bytes of 3.13's `_Py_DebugOffsets` read here: up to the unicode object's fields.
const DEBUG_OFFSETS_SIZE: usize = 8 * 71;

/// `interpreter_state.imports_modules` of 3.13's `_Py_DebugOffsets` (see
/// [`debug_offsets`] for its words).
fn modules_in_debug_offsets(raw: &[u8]) -> Option<u64> {
    (raw.get(..8)? == b"xdebugpy").then_some(())?;
    Some(u64::from_le_bytes(raw.get(11 * 8..12 * 8)?.try_into().ok()?))
}

/// 3.13's `_Py_DebugOffsets`: a cookie, the version, then groups of 64-bit offsets,
/// each group led by its struct's size.
fn debug_offsets(raw: &[u8]) -> Option<(PyLayout, Objects)> {
    if raw.get(..8)? != b"xdebugpy" {
        return None;
    }
    let word =
        |i: usize| -> Option<u64> { Some(u64::from_le_bytes(raw.get(i * 8..i * 8 + 8)?.try_into().ok()?)) };
    let small = |i: usize| -> Option<u32> { u32::try_from(word(i)?).ok() };
    // Words: 0 cookie, 1 version, 2 free_threaded; runtime_state 3..=5; interpreter_state
    // 6..=18; thread_state 19..=27; interpreter_frame 28..=33; code_object 34..=43;
    // pyobject 44..=45; type_object 46..=49; tuple 50..=52; list 53..=55; dict 56..=58;
    // float 59..=60; long 61..=63; bytes 64..=66; unicode 67..=70.
    if word(2)? != 0 {
        // The free-threaded build keeps its frames elsewhere.
        return None;
    }
    let layout = PyLayout {
        interpreters_head: word(5)?,
        interp_threads_head: small(9)?,
        tstate_next: small(21)?,
        tstate_native_thread_id: small(25)?,
        tstate_frame: small(23)?,
        cframe_current_frame: NONE,
        frame_previous: small(29)?,
        frame_code: small(30)?,
        frame_instr: small(31)?,
        frame_owner: small(33)?,
        frame_is_entry: NONE,
        code_instructions: small(43)?,
        _pad: 0,
        pidns_dev: 0,
        pidns_ino: 0,
    };
    let objects = Objects {
        code_qualname: word(37)?,
        code_filename: word(35)?,
        code_firstlineno: word(39)?,
        code_linetable: word(38)?,
        ascii_size: word(70)?,
        // 3.13's PyCompactUnicodeObject adds utf8_length and utf8 to PyASCIIObject.
        compact_size: word(70)? + 16,
        unicode_length: word(69)?,
        unicode_state: word(68)?,
    };
    Some((layout, objects))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// pyenv's newest CPython `minor` (`3.12`): its prefix.
    pub(crate) fn pyenv(minor: &str) -> PathBuf {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let root = PathBuf::from(home).join(".pyenv/versions");
        let mut versions: Vec<String> = std::fs::read_dir(&root)
            .expect("pyenv's versions")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|v| v.starts_with(&format!("{minor}.")))
            .collect();
        versions.sort();
        root.join(versions.pop().unwrap_or_else(|| panic!("pyenv has no CPython {minor}")))
    }

    /// `offsetof` on the headers of the CPython at `prefix`.
    pub(crate) fn header_offsets(prefix: &Path, minor: &str) -> std::collections::HashMap<String, u64> {
        let include = prefix.join(format!("include/python{minor}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("offsets");
        let status = std::process::Command::new("gcc")
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(include.join("internal"))
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/src/runtimes/python/testdata/offsets.c"))
            .arg("-o")
            .arg(&bin)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc on {}'s headers", include.display());
        let out = std::process::Command::new(&bin).output().expect("run offsets");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    fn assert_layout(version: &str, (l, o): (PyLayout, Objects), h: &std::collections::HashMap<String, u64>) {
        let none = u64::from(NONE);
        let fields = [
            ("interpreters_head", l.interpreters_head),
            ("interp_threads_head", u64::from(l.interp_threads_head)),
            ("tstate_next", u64::from(l.tstate_next)),
            ("tstate_native_thread_id", u64::from(l.tstate_native_thread_id)),
            ("tstate_frame", u64::from(l.tstate_frame)),
            ("cframe_current_frame", u64::from(l.cframe_current_frame)),
            ("frame_previous", u64::from(l.frame_previous)),
            ("frame_code", u64::from(l.frame_code)),
            ("frame_instr", u64::from(l.frame_instr)),
            ("frame_owner", u64::from(l.frame_owner)),
            ("frame_is_entry", u64::from(l.frame_is_entry)),
            ("code_instructions", u64::from(l.code_instructions)),
            ("code_qualname", o.code_qualname),
            ("code_filename", o.code_filename),
            ("code_firstlineno", o.code_firstlineno),
            ("code_linetable", o.code_linetable),
            ("ascii_size", o.ascii_size),
            ("compact_size", o.compact_size),
            ("unicode_length", o.unicode_length),
            ("unicode_state", o.unicode_state),
        ];
        for (name, ours) in fields {
            assert_eq!(h.get(name).copied().unwrap_or(none), ours, "{version}: {name}");
        }
        if let Some(&cstack) = h.get("owned_by_cstack") {
            assert_eq!(cstack, u64::from(leakmon_common::python::OWNED_BY_CSTACK), "{version}");
        }
    }

    /// The tables of 3.11 and 3.12, and what 3.13's `_Py_DebugOffsets` says (read from
    /// its library as leakmon reads it), against `offsetof` on each one's own headers.
    #[test]
    fn layouts_match_the_installed_headers() {
        for (minor, layout) in [("3.11", v3_11()), ("3.12", v3_12())] {
            let prefix = pyenv(minor);
            assert_layout(minor, layout, &header_offsets(&prefix, minor));
        }
        let prefix = pyenv("3.13");
        let library = prefix.join("lib/libpython3.13.so.1.0");
        let data = std::fs::read(&library).expect("read libpython3.13");
        let file = object::File::parse(&*data).expect("parse libpython3.13");
        let runtime = symbol(&file, "_PyRuntime").expect("_PyRuntime");
        let raw = bytes_at(&file, runtime, DEBUG_OFFSETS_SIZE).expect("_Py_DebugOffsets");
        assert_layout("3.13", debug_offsets(raw).expect("3.13's offsets"), &header_offsets(&prefix, "3.13"));
    }

    #[test]
    fn versions_in_file_names() {
        assert_eq!(version_in_name(Path::new("/usr/lib/libpython3.10.so.1.0")), Some((3, 10)));
        assert_eq!(version_in_name(Path::new("/usr/bin/python3.9")), Some((3, 9)));
        assert_eq!(version_in_name(Path::new("/usr/bin/python3")), None);
    }

    /// The CPythons these machines have: Debian's, and pyenv's 3.11 to 3.13.
    pub fn interpreters() -> Vec<String> {
        let mut found = vec!["/usr/bin/python3".to_owned()];
        for minor in ["3.11", "3.12", "3.13"] {
            found.push(pyenv(minor).join(format!("bin/python{minor}")).display().to_string());
        }
        found
    }
}
