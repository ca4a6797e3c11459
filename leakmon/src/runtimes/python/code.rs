//! Naming Python frames: code objects read from a live process's memory.
//!
//! In: the encoded frames the kernel appended to a stack (see
//! `leakmon_common::python`). Out: frames with the code's qualified name, its file and
//! the line of the instruction. A code object is read once per process (its name,
//! file, first line and line table) and kept; one whose type is not `PyCode_Type` is
//! refused, and with it the stack's Python frames.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt as _,
    sync::{Arc, Mutex},
};

use super::{lines::line_of, Interpreter};

/// What naming frames of one code object needs.
#[derive(Debug)]
pub struct Code {
    pub qualname: String,
    pub filename: String,
    first_line: u32,
    linetable: Vec<u8>,
}

impl Code {
    /// The line of the instruction `lasti` code units in.
    pub fn line(&self, lasti: u32) -> Option<u32> {
        line_of(&self.linetable, self.first_line, lasti)
    }
}

/// Code objects are kept per process up to this many; past it the cache starts over.
const MAX_CODES: usize = 65536;

/// Longest line table or name read.
const MAX_BYTES: u64 = 1 << 20;

/// One CPython process being named.
#[derive(Debug)]
pub struct Process {
    pub interpreter: Interpreter,
    mem: File,
    codes: Mutex<HashMap<u64, Option<Arc<Code>>>>,
}

impl Process {
    /// Opens `pid`'s memory; `None` once it is gone.
    pub fn open(pid: u32, interpreter: Interpreter) -> Option<Self> {
        let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
        Some(Self { interpreter, mem, codes: Mutex::new(HashMap::new()) })
    }

    /// Reads, while the process still lives (held at its exit), every code object the
    /// Python frames of `stacks` name, so they can be named once it is gone.
    pub fn prefetch<'a>(&self, stacks: impl IntoIterator<Item = &'a [u64]>) {
        for word in stacks.into_iter().flatten() {
            if let Some(frame) = leakmon_common::python::decode(*word) {
                self.code(frame.code);
            }
        }
    }

    /// The code object at `addr`, read once; `None` when it is not one.
    pub fn code(&self, addr: u64) -> Option<Arc<Code>> {
        let mut codes = self.codes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(known) = codes.get(&addr) {
            return known.clone();
        }
        if codes.len() >= MAX_CODES {
            codes.clear();
        }
        let code = self.read_code(addr).map(Arc::new);
        codes.insert(addr, code.clone());
        code
    }

    fn read_code(&self, addr: u64) -> Option<Code> {
        let o = &self.interpreter.objects;
        // ob_type follows ob_refcnt in every object.
        if self.word(addr + 8)? != self.interpreter.code_type {
            return None;
        }
        let linetable = self.word(addr + o.code_linetable)?;
        // A bytes object: ob_size at 16, the bytes at 32.
        let len = self.word(linetable + 16)?;
        if len > MAX_BYTES {
            return None;
        }
        Some(Code {
            qualname: self.string(self.word(addr + o.code_qualname)?)?,
            filename: self.string(self.word(addr + o.code_filename)?)?,
            first_line: u32::try_from(
                self.read(addr + o.code_firstlineno, 4)
                    .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))?,
            )
            .ok()?,
            linetable: self.read(linetable + 32, len as usize)?,
        })
    }

    /// A compact `str` object's text.
    fn string(&self, addr: u64) -> Option<String> {
        text(&|at, len| self.read(at, len), &self.interpreter.objects, addr)
    }

    fn word(&self, addr: u64) -> Option<u64> {
        Some(u64::from_le_bytes(self.read(addr, 8)?.try_into().ok()?))
    }

    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0; len];
        self.mem.read_exact_at(&mut buf, addr).ok()?;
        Some(buf)
    }
}

/// A compact `str` object's text, read through `read` (address, length).
pub fn text(read: &dyn Fn(u64, usize) -> Option<Vec<u8>>, o: &super::Objects, addr: u64) -> Option<String> {
    let len = u64::from_le_bytes(read(addr + o.unicode_length, 8)?.try_into().ok()?);
    let state = u32::from_le_bytes(read(addr + o.unicode_state, 4)?.try_into().ok()?);
    let (kind, compact, ascii) = ((state >> 2) & 7, state >> 5 & 1 == 1, state >> 6 & 1 == 1);
    if !compact || len > MAX_BYTES {
        return None;
    }
    if ascii {
        return String::from_utf8(read(addr + o.ascii_size, len as usize)?).ok();
    }
    let width = match kind {
        1 | 2 | 4 => u64::from(kind),
        _ => return None,
    };
    let raw = read(addr + o.compact_size, (len * width) as usize)?;
    Some(
        raw.chunks(width as usize)
            .map(|c| {
                let mut unit = [0u8; 4];
                unit[..c.len()].copy_from_slice(c);
                char::from_u32(u32::from_le_bytes(unit)).unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
    )
}
