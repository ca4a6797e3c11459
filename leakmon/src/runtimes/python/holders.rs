//! What holds a CPython process's objects: the module global, class attribute or
//! frame's local variable from which each object the agent sampled in a window is
//! reached, and the path from it.
//!
//! The walk runs from outside, with every thread held still (the holders scan's stop):
//! nothing runs in the process and nothing is written there, so there is nothing to
//! undo and a leakmon killed mid-walk leaves the process as it was (the kernel lets a
//! tracer's threads go). It reads the interpreter's objects as CPython lays them out
//! ([`super::heap`]): first from every module's globals (`sys.modules`), breadth first,
//! so an object is named by the shortest path from a variable; then from each thread's
//! frames (their locals and evaluation stacks) for what no global holds. Containers it
//! knows (dict and its subclasses, list, tuple, set, a module, a class, an instance's
//! attributes, a function's closure and defaults, a cell, a bound method) are followed;
//! other objects (C extensions' among them) are leaves.
//!
//! Every value read is the process's: a pointer is followed only once its target's
//! type checks out, counts are capped, and the walk ends at its budget.

use std::{
    cell::RefCell,
    collections::VecDeque,
    time::{Duration, Instant},
};

use rustc_hash::{FxHashMap, FxHashSet};

use anyhow::{Context as _, Result};

use super::{
    heap::{self, flags, Managed},
    Interpreter,
};
use crate::{
    holders::{
        reach::{word, Memory},
        scan::Known,
        stop::Stopped,
    },
    procfs::ProcRoot,
    runtimes::held_by::{Found, Holder, Root, Step, MAX_HOLDERS},
};

/// Bytes read from the process at once, and kept.
const PAGE: u64 = 64 << 10;
/// Pages kept: 64 MiB.
const MAX_PAGES: usize = 1024;
/// Objects that refer to others a walk keeps at most (16 bytes each).
const MAX_LINKS: usize = 64 << 20;
/// Items read of one container at most.
const MAX_ITEMS: u64 = 1 << 26;
/// Frames walked per thread, threads per interpreter.
const MAX_FRAMES: usize = 4096;
const MAX_THREADS: usize = 4096;
/// Items of a frame (locals and stack) looked at.
const MAX_FRAME_ITEMS: u64 = 1 << 16;
/// Steps of a path given.
const MAX_PATH: usize = 24;

/// Walks the objects of `pid` (running `py`), held still for at most `budget`, and
/// names what holds each of the window's sampled objects `known` that counts. With
/// `stop`, every thread is stopped for it; otherwise the process is already held (at
/// its exit, by the report's tracer).
pub fn holders(
    proc_root: &ProcRoot,
    pid: u32,
    py: &Interpreter,
    known: &[Known],
    budget: Duration,
    stop: bool,
) -> Result<Found> {
    let mem = crate::ptrace::remote::open_mem_for(proc_root, pid, false)?;
    let memory = crate::holders::scan::ProcessMemory::new(pid, mem);
    let pages = Pages { mem: &memory, pages: RefCell::new(FxHashMap::default()) };
    let stopped = if stop { Some(Stopped::all(proc_root, pid)?) } else { None };
    fail::fail_point!("python-holders-stopped");
    let since = stopped.as_ref().map_or_else(Instant::now, |s| s.since);
    let deadline = since + budget;
    let maps = proc_root.maps_text(pid).with_context(|| format!("read the mappings of pid {pid}"))?;
    // Only the blocks that count are looked for; each sized by its chunk's header
    // (a sampled block's entry holds the bytes it stands for).
    let known: Vec<(Known, u64)> = known
        .iter()
        .filter(|k| k.counted)
        .map(|k| (*k, k.size.or_else(|| crate::holders::chunks::usable(&pages, k.start)).unwrap_or(16)))
        .collect();
    let mut walk = Walk::new(&pages, py, &crate::holders::scan::writable(&maps), &known);
    let complete = walk.run(&mut || Instant::now() < deadline);
    // Names are read while the objects are as they were.
    let mut found = walk.place(&known);
    found.pause = since.elapsed();
    drop(stopped);
    let (major, minor, micro) = py.version;
    let pause_ms = found.pause.as_secs_f64() * 1e3;
    let mut how = format!(
        "CPython {major}.{minor}.{micro}'s objects were walked from its modules' globals, then its threads' frames, with the process held still for {pause_ms:.0} ms ({} objects reached); the agent's sampled objects of the window were found on the paths",
        walk.reached
    );
    if !complete {
        how.push_str(&format!(
            ". The walk ran out of its {} ms budget and let the process go: objects it did not reach count as unreached (a larger --holders-budget walks further)",
            budget.as_millis()
        ));
    }
    let unreached: u64 = found.holders.iter().filter(|h| h.root.kind == UNREACHED).map(|h| h.bytes).sum();
    if unreached > 0 {
        how.push_str(&format!(
            ". {} of them were reached from no global or frame: held by C code or by a container leakmon does not follow (a deque, an extension's object), or garbage in a cycle the collector has not freed yet",
            crate::units::bytes(unreached)
        ));
    }
    found.how = how;
    Ok(found)
}

/// The root of objects no walk reached.
pub const UNREACHED: &str = "unreached";

/// The process's memory, read a page at a time and kept: a walk reads objects near
/// each other.
struct Pages<'a> {
    mem: &'a dyn Memory,
    pages: RefCell<FxHashMap<u64, Box<[u8]>>>,
}

impl Memory for Pages<'_> {
    fn read_into(&self, start: u64, buf: &mut [u8]) -> Option<usize> {
        let page = start & !(PAGE - 1);
        let end = start.checked_add(buf.len() as u64)?;
        if end > page + PAGE {
            return self.mem.read_into(start, buf);
        }
        let mut pages = self.pages.borrow_mut();
        if !pages.contains_key(&page) {
            if pages.len() >= MAX_PAGES {
                pages.clear();
            }
            let mut data = vec![0u8; PAGE as usize];
            let got = self.mem.read_into(page, &mut data).unwrap_or(0);
            data.truncate(got);
            pages.insert(page, data.into_boxed_slice());
        }
        let data = &pages[&page];
        let at = (start - page) as usize;
        if let Some(bytes) = data.get(at..at + buf.len()) {
            buf.copy_from_slice(bytes);
            return Some(buf.len());
        }
        // A page read in part (a mapping starts or ends inside it).
        drop(pages);
        self.mem.read_into(start, buf)
    }
}

fn byte(mem: &dyn Memory, at: u64) -> Option<u8> {
    let mut b = [0u8; 1];
    (mem.read_into(at, &mut b)? == 1).then_some(b[0])
}

fn int32(mem: &dyn Memory, at: u64) -> Option<i32> {
    let mut b = [0u8; 4];
    (mem.read_into(at, &mut b)? == 4).then(|| i32::from_le_bytes(b))
}

/// `n` words from `at`, read a page's worth at a time; `None` past the first
/// unreadable one.
fn words(mem: &dyn Memory, at: u64, n: u64) -> Vec<u64> {
    let mut out = Vec::with_capacity(n.min(8192) as usize);
    let mut buf = vec![0u8; PAGE as usize];
    let mut done = 0;
    while done < n {
        let count = (n - done).min(PAGE / 8);
        let chunk = &mut buf[..(count * 8) as usize];
        let Some(got) = mem.read_into(at + done * 8, chunk) else { break };
        out.extend(chunk[..got - got % 8].as_chunks::<8>().0.iter().map(|w| u64::from_le_bytes(*w)));
        if got < chunk.len() {
            break;
        }
        done += count;
    }
    out
}

/// Whether `p` may point at an object: a user address, 8-byte aligned.
fn plausible(p: u64) -> bool {
    p != 0 && p.trailing_zeros() >= 3 && p < 1 << 47
}

/// How a walk follows one type's objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dict,
    List,
    Tuple,
    Set,
    Module,
    Function,
    Cell,
    Method,
    /// A class: its attributes.
    Type,
    Leaf,
}

#[derive(Clone, Debug)]
struct TypeInfo {
    kind: Kind,
    flags: u64,
    basicsize: u64,
    dictoffset: i64,
    cached_keys: u64,
    name: std::rc::Rc<str>,
}

/// How a node was reached from its parent.
#[derive(Clone, Copy, Debug)]
enum Edge {
    Root,
    /// A dict's value under this key object.
    Value(u64),
    /// A dict's key object itself.
    Key(u64),
    /// An attribute (an instance's or a class's), by its name object.
    Attr(u64),
    Index(u32),
    /// A set's member.
    Member,
    /// A closure's cell, by its variable's name object.
    Free(u64),
    Field(&'static str),
    /// Memory an object owns that is no object: a dict's table, a list's items.
    Table(&'static str),
}

/// An object the walk reached that refers to others: where it is, the object it was
/// reached from (an index of these; [`NO_PARENT`] for a root's value) and its root.
/// Objects that refer to nothing (strings, numbers) get none: most of a heap's are
/// leaves, and a reached one is only marked [`Seen`].
#[derive(Clone, Copy, Debug)]
struct Link {
    addr: u64,
    parent: u32,
    root: u32,
}

const NO_PARENT: u32 = u32::MAX;

/// Where [`Walk::emit`] sends what an object refers to.
#[derive(Clone, Copy, Debug)]
enum To {
    Nowhere,
    /// Reached from link `parent`; `any` once something was.
    Reach {
        parent: u32,
        root: u32,
        any: bool,
    },
    /// Only the edge to `child` is wanted.
    Find {
        child: u64,
        edge: Option<Edge>,
    },
}

/// What is done with each (key, value) of a dict.
type Each = fn(&mut Walk<'_>, u64, u64);

/// Entries of a dict read at once.
const ENTRIES_AT_ONCE: u64 = 4096;

/// The objects reached: a bit per word of the process's writable memory, where
/// objects are (a hash set for anything else).
struct Seen {
    /// (start, end, first bit), in address order.
    regions: Vec<(u64, u64, u64)>,
    bits: Vec<u64>,
    other: FxHashSet<u64>,
}

impl Seen {
    fn new(writable: &[(u64, u64)]) -> Self {
        let mut regions = Vec::new();
        let mut total = 0u64;
        for &(start, end) in writable {
            let words = (end - start) / 8;
            if total + words > MAX_SEEN_BITS {
                break;
            }
            regions.push((start, end, total));
            total += words;
        }
        Self { regions, bits: vec![0; total.div_ceil(64) as usize], other: FxHashSet::default() }
    }

    /// Marks `addr`; whether it was not marked before.
    fn insert(&mut self, addr: u64) -> bool {
        let i = self.regions.partition_point(|r| r.1 <= addr);
        match self.regions.get(i) {
            Some(&(start, _, first)) if start <= addr => {
                let bit = first + (addr - start) / 8;
                let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
                let new = self.bits[word] & mask == 0;
                self.bits[word] |= mask;
                new
            }
            _ => self.other.insert(addr),
        }
    }

    fn contains(&self, addr: u64) -> bool {
        let i = self.regions.partition_point(|r| r.1 <= addr);
        match self.regions.get(i) {
            Some(&(start, _, first)) if start <= addr => {
                let bit = first + (addr - start) / 8;
                self.bits[(bit / 64) as usize] & (1u64 << (bit % 64)) != 0
            }
            _ => self.other.contains(&addr),
        }
    }
}

/// Bits of [`Seen`] at most: 1 GiB of them covers 64 GiB of writable memory.
const MAX_SEEN_BITS: u64 = 8 << 30;

struct Walk<'a> {
    mem: &'a dyn Memory,
    py: &'a Interpreter,
    seen: Seen,
    links: Vec<Link>,
    queue: VecDeque<Link>,
    types: FxHashMap<u64, Option<TypeInfo>>,
    roots: Vec<Root>,
    /// Where what the object being expanded refers to goes: reached from this link
    /// (and root), or, looking for one child, the edge to it.
    to: To,
    /// Pairs of a dict read whole.
    pairs: Vec<(u64, u64)>,
    /// Where the sampled objects may be: each block's first words.
    targets: FxHashSet<u64>,
    /// Each target reached: the link it was reached from, its root, and the table's
    /// name where it is one.
    hits: FxHashMap<u64, (u32, u32, Option<&'static str>)>,
    /// Objects (and tables) reached.
    reached: u64,
}

impl<'a> Walk<'a> {
    /// A walk of the process's memory `mem` (its writable ranges `writable`), looking
    /// for the blocks `known` (each `size`d).
    fn new(
        mem: &'a dyn Memory,
        py: &'a Interpreter,
        writable: &[(u64, u64)],
        known: &[(Known, u64)],
    ) -> Self {
        let targets = known
            .iter()
            .flat_map(|(k, size)| (0..(*size).min(64)).step_by(8).map(|off| k.start + off))
            .collect();
        Self {
            mem,
            py,
            seen: Seen::new(writable),
            links: Vec::new(),
            queue: VecDeque::new(),
            types: FxHashMap::default(),
            roots: Vec::new(),
            to: To::Nowhere,
            pairs: Vec::new(),
            targets,
            hits: FxHashMap::default(),
            reached: 0,
        }
    }

    /// The whole walk: modules' globals, then frames; whether it ended within `go_on`.
    fn run(&mut self, go_on: &mut dyn FnMut() -> bool) -> bool {
        self.globals();
        if !self.flood(go_on) {
            return false;
        }
        self.frames();
        self.flood(go_on)
    }

    fn flood(&mut self, go_on: &mut dyn FnMut() -> bool) -> bool {
        let mut turns = 0u32;
        while let Some(link) = self.queue.pop_front() {
            turns += 1;
            if turns.is_multiple_of(1024) && !go_on() {
                return false;
            }
            if self.links.len() >= MAX_LINKS {
                return false;
            }
            // Kept only if it refers to something.
            let parent = self.links.len() as u32;
            self.links.push(link);
            self.to = To::Reach { parent, root: link.root, any: false };
            self.refers(link.addr);
            if let To::Reach { any: false, .. } = std::mem::replace(&mut self.to, To::Nowhere) {
                self.links.pop();
            }
        }
        true
    }

    /// Marks the object (or table) at `addr` reached, unless it was; queues an object.
    fn reach(&mut self, addr: u64, parent: u32, root: u32, edge: Edge) {
        if !plausible(addr) || !self.seen.insert(addr) {
            return;
        }
        self.reached += 1;
        if self.targets.contains(&addr) {
            let table = match edge {
                Edge::Table(t) => Some(t),
                _ => None,
            };
            self.hits.insert(addr, (parent, root, table));
        }
        if !matches!(edge, Edge::Table(_)) {
            self.queue.push_back(Link { addr, parent, root });
        }
    }

    /// What the object being expanded refers to at `addr`, by `edge`.
    fn emit(&mut self, addr: u64, edge: Edge) {
        if !plausible(addr) {
            return;
        }
        match &mut self.to {
            To::Reach { parent, root, any } => {
                let (parent, root) = (*parent, *root);
                *any = true;
                self.reach(addr, parent, root, edge);
            }
            To::Find { child, edge: found } => {
                if *child == addr && found.is_none() {
                    *found = Some(edge);
                }
            }
            To::Nowhere => {}
        }
    }

    /// The edge from the object at `parent` to `child`, where it still refers to it.
    fn edge(&mut self, parent: u64, child: u64) -> Option<Edge> {
        self.to = To::Find { child, edge: None };
        self.refers(parent);
        match std::mem::replace(&mut self.to, To::Nowhere) {
            To::Find { edge, .. } => edge,
            _ => None,
        }
    }

    /// A root's value, unless it was reached before.
    fn source(&mut self, value: u64, root: Root) {
        if !plausible(value) || self.seen.contains(value) {
            return;
        }
        let index = self.roots.len() as u32;
        self.roots.push(root);
        self.reach(value, NO_PARENT, index, Edge::Root);
    }

    fn type_of(&mut self, obj: u64) -> Option<TypeInfo> {
        let t = word(self.mem, obj + heap::OB_TYPE)?;
        if !plausible(t) {
            return None;
        }
        if let Some(known) = self.types.get(&t) {
            return known.clone();
        }
        let info = self.read_type(t);
        self.types.insert(t, info.clone());
        info
    }

    /// The type at `t`, if it is one: its own type is `type` or a metaclass.
    fn read_type(&self, t: u64) -> Option<TypeInfo> {
        let ty = &self.py.types;
        let meta = word(self.mem, t + heap::OB_TYPE)?;
        if meta != ty.type_ && word(self.mem, meta + heap::TYPE_FLAGS)? & flags::TYPE_SUBCLASS == 0 {
            return None;
        }
        let type_flags = word(self.mem, t + heap::TYPE_FLAGS)?;
        let kind = if t == ty.dict {
            Kind::Dict
        } else if t == ty.list {
            Kind::List
        } else if t == ty.tuple {
            Kind::Tuple
        } else if t == ty.set || t == ty.frozenset {
            Kind::Set
        } else if t == ty.module {
            Kind::Module
        } else if t == ty.function {
            Kind::Function
        } else if t == ty.cell {
            Kind::Cell
        } else if t == ty.method {
            Kind::Method
        } else if type_flags & flags::TYPE_SUBCLASS != 0 {
            Kind::Type
        } else if type_flags & flags::DICT_SUBCLASS != 0 {
            Kind::Dict
        } else if type_flags & flags::LIST_SUBCLASS != 0 {
            Kind::List
        } else if type_flags & flags::TUPLE_SUBCLASS != 0 {
            Kind::Tuple
        } else {
            Kind::Leaf
        };
        let heap_type = type_flags & flags::HEAPTYPE != 0;
        let name = word(self.mem, t + heap::TYPE_NAME).and_then(|p| c_string(self.mem, p));
        Some(TypeInfo {
            kind,
            flags: type_flags,
            basicsize: word(self.mem, t + heap::TYPE_BASICSIZE)?,
            dictoffset: word(self.mem, t + heap::TYPE_DICTOFFSET)? as i64,
            cached_keys: if heap_type {
                word(self.mem, t + self.py.heap.type_cached_keys).unwrap_or(0)
            } else {
                0
            },
            name: name.unwrap_or_else(|| "?".into()).into(),
        })
    }

    /// Gives what the object at `addr` refers to, each by its edge, to [`Self::emit`].
    fn refers(&mut self, addr: u64) {
        let Some(t) = self.type_of(addr) else { return };
        let field = |off: u64| word(self.mem, addr + off).unwrap_or(0);
        match t.kind {
            Kind::Dict => self.dict(addr, |w, key, value| {
                w.emit(key, Edge::Key(key));
                w.emit(value, Edge::Value(key));
            }),
            Kind::List => {
                let (n, items) = (field(heap::OB_SIZE), field(heap::LIST_ITEMS));
                if plausible(items) {
                    self.emit(items, Edge::Table("list (items)"));
                    self.array(items, n);
                }
            }
            Kind::Tuple => self.array(addr + heap::TUPLE_ITEMS, field(heap::OB_SIZE)),
            Kind::Set => {
                let (mask, table) = (field(heap::SET_MASK), field(heap::SET_TABLE));
                if table != addr + heap::SET_SMALLTABLE {
                    self.emit(table, Edge::Table("set (table)"));
                }
                let slots = mask.saturating_add(1).min(MAX_ITEMS);
                let entries = words(self.mem, table, slots * 2);
                for key in entries.as_chunks::<2>().0.iter().map(|e| e[0]) {
                    self.emit(key, Edge::Member);
                }
            }
            Kind::Module => self.emit(field(heap::MODULE_DICT), Edge::Field("__dict__")),
            Kind::Function => {
                self.closure(field(heap::FUNC_CLOSURE), field(heap::FUNC_CODE));
                for (off, name) in [
                    (heap::FUNC_DEFAULTS, "__defaults__"),
                    (heap::FUNC_KWDEFAULTS, "__kwdefaults__"),
                    (heap::FUNC_DICT, "__dict__"),
                ] {
                    self.emit(field(off), Edge::Field(name));
                }
            }
            Kind::Cell => self.emit(field(heap::CELL_REF), Edge::Field("cell_contents")),
            Kind::Method => {
                self.emit(field(heap::METHOD_FUNC), Edge::Field("__func__"));
                self.emit(field(heap::METHOD_SELF), Edge::Field("__self__"));
            }
            Kind::Type => {
                // A class's own attributes (a built-in type's are not ones a program sets).
                let own = word(self.mem, addr + heap::TYPE_FLAGS).unwrap_or(0) & flags::HEAPTYPE != 0;
                let dict = field(heap::TYPE_DICT);
                if own && plausible(dict) {
                    self.attributes(dict);
                }
            }
            Kind::Leaf => {}
        }
        if t.flags & flags::HEAPTYPE != 0 && t.kind != Kind::Type {
            self.instance(addr, &t);
        }
    }

    /// A function's closure: its cells, each by the variable it is (the code's last
    /// names are its free variables, in the closure's order).
    fn closure(&mut self, cells: u64, code: u64) {
        if !plausible(cells) || word(self.mem, cells + heap::OB_TYPE) != Some(self.py.types.tuple) {
            return;
        }
        self.emit(cells, Edge::Table("__closure__"));
        let n = word(self.mem, cells + heap::OB_SIZE).unwrap_or(0).min(MAX_FRAME_ITEMS);
        let names = (word(self.mem, code + heap::OB_TYPE) == Some(self.py.code_type))
            .then(|| {
                let count = int32(self.mem, code + self.py.heap.code_nlocalsplus)?.max(0) as u64;
                let names = word(self.mem, code + heap::CODE_LOCALSPLUSNAMES)?;
                Some(
                    words(self.mem, names + heap::TUPLE_ITEMS, count)
                        .split_off(count.saturating_sub(n) as usize),
                )
            })
            .flatten()
            .filter(|names| names.len() as u64 == n)
            .unwrap_or_default();
        for (j, cell) in words(self.mem, cells + heap::TUPLE_ITEMS, n).into_iter().enumerate() {
            match names.get(j) {
                Some(&name) => self.emit(cell, Edge::Free(name)),
                None => self.emit(cell, Edge::Index(j as u32)),
            }
        }
    }

    /// The items of an array of `n` object pointers at `at`.
    fn array(&mut self, at: u64, n: u64) {
        for (j, item) in words(self.mem, at, n.min(MAX_ITEMS)).into_iter().enumerate() {
            self.emit(item, Edge::Index(j as u32));
        }
    }

    /// An instance's attributes, wherever its version keeps them.
    fn instance(&mut self, addr: u64, t: &TypeInfo) {
        let ptr = |at: u64| word(self.mem, at).unwrap_or(0);
        if t.flags & flags::MANAGED_DICT != 0 {
            let before = addr.wrapping_sub(24);
            match self.py.heap.managed {
                Managed::Pointers => {
                    let dict = ptr(before);
                    if plausible(dict) {
                        self.attributes(dict);
                    } else {
                        self.values(ptr(addr.wrapping_sub(32)), t.cached_keys, true);
                    }
                }
                Managed::Tagged => {
                    let slot = ptr(before);
                    if slot & 1 == 1 {
                        // Tagged one byte short of the values (`dorv.values + 1`).
                        self.values(slot + 1, t.cached_keys, true);
                    } else if plausible(slot) {
                        self.attributes(slot);
                    }
                }
                Managed::Inline => {
                    let dict = ptr(before);
                    if plausible(dict) {
                        self.attributes(dict);
                    } else if t.flags & flags::INLINE_VALUES != 0 {
                        let values = addr + t.basicsize;
                        // `valid`: the values are the instance's (no dict took them over).
                        if byte(self.mem, values + 3) == Some(1) {
                            self.values(values, t.cached_keys, false);
                        }
                    }
                }
            }
        } else if t.dictoffset > 0 {
            let dict = ptr(addr + t.dictoffset as u64);
            if plausible(dict) {
                self.attributes(dict);
            }
        }
    }

    /// A dict of attributes (an instance's, a class's): the dict and its tables are
    /// the owner's, its values its attributes.
    fn attributes(&mut self, dict: u64) {
        if word(self.mem, dict + heap::OB_TYPE) != Some(self.py.types.dict) {
            return;
        }
        self.emit(dict, Edge::Table("__dict__"));
        self.dict(dict, |w, key, value| w.emit(value, Edge::Attr(key)));
    }

    /// Values kept apart from a dict, their keys in the class (`keys`); `owned` where
    /// they are a block of their own.
    fn values(&mut self, values: u64, keys: u64, owned: bool) {
        if !plausible(values) || !plausible(keys) {
            return;
        }
        if owned {
            self.emit(values, Edge::Table("(attribute values)"));
        }
        self.entries(keys, values, |w, key, value| w.emit(value, Edge::Attr(key)));
    }

    /// Each of a dict's (key, value) pairs given to `each`; its tables are the dict's.
    fn dict(&mut self, addr: u64, each: Each) {
        let keys = word(self.mem, addr + heap::DICT_KEYS).unwrap_or(0);
        let values = word(self.mem, addr + heap::DICT_VALUES).unwrap_or(0);
        if !plausible(keys) {
            return;
        }
        if plausible(values) {
            // Keys shared with its class's other instances: the class's.
            self.emit(values, Edge::Table("dict (values)"));
        } else {
            self.emit(keys, Edge::Table("dict (table)"));
        }
        self.entries(keys, values, each);
    }

    /// Each (key, value) pair of the keys table `keys` given to `each`, the values
    /// in `values` where they are kept apart (a split table); read a page at a time.
    fn entries(&mut self, keys: u64, values: u64, each: Each) {
        let (Some(log2_index_bytes), Some(kind), Some(log2_size), Some(n)) = (
            byte(self.mem, keys + heap::KEYS_LOG2_INDEX_BYTES),
            byte(self.mem, keys + heap::KEYS_KIND),
            byte(self.mem, keys + heap::KEYS_LOG2_SIZE),
            word(self.mem, keys + heap::KEYS_NENTRIES),
        ) else {
            return;
        };
        if log2_index_bytes > 40 || log2_size > 40 {
            return;
        }
        let n = n.min(1 << log2_size).min(MAX_ITEMS);
        let at = keys + heap::KEYS_INDICES + (1u64 << log2_index_bytes);
        let width = if kind == heap::KEYS_GENERAL { 3 } else { 2 };
        let split = plausible(values);
        let mut from = 0;
        while from < n {
            let count = (n - from).min(ENTRIES_AT_ONCE);
            let raw = words(self.mem, at + from * width * 8, count * width);
            let kept = if split {
                words(self.mem, values + self.py.heap.values_values + from * 8, count)
            } else {
                Vec::new()
            };
            for (j, e) in raw.chunks_exact(width as usize).enumerate() {
                let key = e[width as usize - 2];
                let value = if split { kept.get(j).copied().unwrap_or(0) } else { e[width as usize - 1] };
                if key != 0 {
                    each(self, key, value);
                }
            }
            if (raw.len() as u64) < count * width {
                return;
            }
            from += count;
        }
    }

    /// Roots of every module's globals, `__main__`'s first; modules and their dicts
    /// are marked so no path runs through them.
    fn globals(&mut self) {
        let ty = self.py.types;
        let Some(interp) = word(self.mem, self.py.layout.interpreters_head) else { return };
        let Some(modules) = word(self.mem, interp + self.py.heap.interp_modules) else { return };
        if word(self.mem, modules + heap::OB_TYPE) != Some(ty.dict) {
            return;
        }
        self.seen.insert(modules);
        let mut all: Vec<(String, u64)> = Vec::new();
        for (name, module) in self.entries_of(modules) {
            let Some(t) = self.type_of(module) else { continue };
            if t.kind != Kind::Module {
                continue;
            }
            let dict = word(self.mem, module + heap::MODULE_DICT).unwrap_or(0);
            if word(self.mem, dict + heap::OB_TYPE) != Some(ty.dict) {
                continue;
            }
            // Roots are taken from them; no path runs through them.
            self.seen.insert(module);
            self.seen.insert(dict);
            all.push((self.text(name).unwrap_or_else(|| "?".into()), dict));
        }
        all.sort_by_key(|(name, _)| name != "__main__");
        for (module, dict) in all {
            for (key, value) in self.entries_of(dict) {
                if !plausible(value) || self.seen.contains(value) {
                    continue;
                }
                let name = self.text(key).unwrap_or_else(|| "?".into());
                self.source(value, Root { kind: "global", name, scope: Some(module.clone()) });
            }
        }
    }

    /// A dict's pairs (a module's globals, `sys.modules`).
    fn entries_of(&mut self, dict: u64) -> Vec<(u64, u64)> {
        let keys = word(self.mem, dict + heap::DICT_KEYS).unwrap_or(0);
        let values = word(self.mem, dict + heap::DICT_VALUES).unwrap_or(0);
        self.pairs.clear();
        if plausible(keys) {
            self.entries(keys, values, |w, key, value| w.pairs.push((key, value)));
        }
        std::mem::take(&mut self.pairs)
    }

    /// Roots of each thread's frames: their local variables and evaluation stacks.
    fn frames(&mut self) {
        let l = self.py.layout;
        let Some(interp) = word(self.mem, l.interpreters_head) else { return };
        let mut tstate = word(self.mem, interp + u64::from(l.interp_threads_head)).unwrap_or(0);
        for _ in 0..MAX_THREADS {
            if !plausible(tstate) {
                break;
            }
            let mut frame = word(self.mem, tstate + u64::from(l.tstate_frame)).unwrap_or(0);
            if l.cframe_current_frame != leakmon_common::python::NONE && plausible(frame) {
                frame = word(self.mem, frame + u64::from(l.cframe_current_frame)).unwrap_or(0);
            }
            for _ in 0..MAX_FRAMES {
                if !plausible(frame) {
                    break;
                }
                self.frame(frame);
                frame = word(self.mem, frame + u64::from(l.frame_previous)).unwrap_or(0);
            }
            tstate = word(self.mem, tstate + u64::from(l.tstate_next)).unwrap_or(0);
        }
    }

    fn frame(&mut self, frame: u64) {
        let (l, o) = (self.py.layout, self.py.objects);
        let Some(code) = word(self.mem, frame + u64::from(l.frame_code)) else { return };
        if word(self.mem, code + heap::OB_TYPE) != Some(self.py.code_type) {
            return;
        }
        let function =
            word(self.mem, code + o.code_qualname).and_then(|q| self.text(q)).unwrap_or_else(|| "?".into());
        let nlocals = int32(self.mem, code + self.py.heap.code_nlocalsplus).unwrap_or(0).max(0) as u64;
        let top = int32(self.mem, frame + heap::FRAME_STACKTOP).unwrap_or(0).max(0) as u64;
        let names = word(self.mem, code + heap::CODE_LOCALSPLUSNAMES).unwrap_or(0);
        let items = words(self.mem, frame + heap::FRAME_LOCALSPLUS, top.max(nlocals).min(MAX_FRAME_ITEMS));
        for (j, item) in items.into_iter().enumerate() {
            if !plausible(item) || self.seen.contains(item) {
                continue;
            }
            let j = j as u64;
            let name = if j < nlocals {
                word(self.mem, names + heap::TUPLE_ITEMS + 8 * j).and_then(|n| self.text(n))
            } else {
                Some("(evaluation stack)".to_owned())
            };
            let name = name.unwrap_or_else(|| "?".into());
            self.source(item, Root { kind: "local", name, scope: Some(function.clone()) });
        }
    }

    fn text(&self, addr: u64) -> Option<String> {
        if word(self.mem, addr + heap::OB_TYPE)? != self.py.types.str_ {
            return None;
        }
        super::code::text(
            &|at, len| self.mem.read(at, len).filter(|b| b.len() == len),
            &self.py.objects,
            addr,
        )
    }

    /// An int's value, where it fits a word (3.11's sign in `ob_size`; 3.12 and later
    /// keep it in `lv_tag`).
    fn int(&self, addr: u64) -> Option<i64> {
        let tag = word(self.mem, addr + heap::OB_SIZE)? as i64;
        let (digits, negative) = if self.py.version.1 >= 12 {
            ((tag as u64 >> 3) as i64, tag & 3 == 2)
        } else {
            (tag.abs(), tag < 0)
        };
        if digits > 2 {
            return None;
        }
        let d = words(self.mem, addr + 24, 1).first().copied()?;
        let (low, high) = (d & 0x3fff_ffff, (d >> 32) & 0x3fff_ffff);
        let value = (low + if digits == 2 { high << 30 } else { 0 }) as i64;
        Some(if negative { -value } else { value })
    }

    /// A key as Python writes it: `'name'`, `42`, or its type.
    fn key(&mut self, key: u64) -> String {
        if let Some(s) = self.text(key) {
            let short: String = s.chars().take(40).collect();
            return format!("'{short}{}'", if short.len() < s.len() { "…" } else { "" });
        }
        if word(self.mem, key + heap::OB_TYPE) == Some(self.py.types.int) {
            if let Some(n) = self.int(key) {
                return n.to_string();
            }
        }
        format!("<{}>", self.type_of(key).map_or_else(|| "?".into(), |t| t.name.to_string()))
    }

    fn step(&mut self, edge: Edge) -> Option<String> {
        Some(match edge {
            Edge::Root => return None,
            Edge::Value(k) => format!("[{}]", self.key(k)),
            Edge::Key(k) => format!("(key {})", self.key(k)),
            Edge::Attr(k) => format!(".{}", self.text(k).unwrap_or_else(|| "?".into())),
            Edge::Index(j) => format!("[{j}]"),
            Edge::Member => "{member}".to_owned(),
            Edge::Free(name) => format!("(closure {})", self.text(name).unwrap_or_else(|| "?".into())),
            Edge::Field(f) => format!(".{f}"),
            Edge::Table(t) => format!("({t})"),
        })
    }

    /// The known blocks that count (each with its size), each placed on what its
    /// block holds (an object, past its collector's header, or a table), grouped by
    /// root and type.
    fn place(&mut self, known: &[(Known, u64)]) -> Found {
        // (root, type): bytes, objects, and one object's (address, link).
        let mut groups: FxHashMap<(u32, String), (u64, u64, u64, u32)> = FxHashMap::default();
        let (mut bytes, mut objects) = (0, 0);
        let mut unreached = (0u64, 0u64);
        // Each object is one block's: the one starting nearest below it (blocks do
        // not overlap; an entry whose free was missed may reach over a newer block).
        let mut claimed = FxHashSet::default();
        let mut known: Vec<&(Known, u64)> = known.iter().collect();
        known.sort_by_key(|(k, _)| std::cmp::Reverse(k.start));
        for (k, size) in known {
            bytes += k.weight;
            objects += 1;
            let hit = (0..(*size).min(64))
                .step_by(8)
                .map(|off| k.start + off)
                .find(|at| !claimed.contains(at) && self.hits.contains_key(at))
                .map(|at| (at, self.hits[&at]));
            if let Some((at, _)) = hit {
                claimed.insert(at);
            }
            let Some((addr, (parent, root, table))) = hit else {
                unreached.0 += k.weight;
                unreached.1 += 1;
                continue;
            };
            let kind = match table {
                Some(table) => table.to_owned(),
                None => self.type_of(addr).map_or_else(|| "?".into(), |t| t.name.to_string()),
            };
            let g = groups.entry((root, kind)).or_insert((0, 0, addr, parent));
            g.0 += k.weight;
            g.1 += 1;
        }
        let mut holders: Vec<Holder> = Vec::new();
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.1 .0));
        for ((root, kind), (bytes, objects, addr, parent)) in groups.into_iter().take(MAX_HOLDERS) {
            let (root, path) = self.path(root, addr, parent);
            holders.push(Holder { bytes, objects, kind, root, path });
        }
        if unreached.1 > 0 {
            holders.push(Holder {
                bytes: unreached.0,
                objects: unreached.1,
                kind: "(any)".into(),
                root: Root { kind: UNREACHED, name: String::new(), scope: None },
                path: Vec::new(),
            });
        }
        Found { holders, bytes, objects, pause: Duration::ZERO, heap_used: 0, how: String::new() }
    }

    /// The root (a class's attribute, a closure's variable named as one) and the
    /// steps from it to the object at `addr`, reached from link `parent`.
    fn path(&mut self, root: u32, addr: u64, parent: u32) -> (Root, Vec<Step>) {
        let mut chain = vec![addr];
        let mut at = parent;
        while at != NO_PARENT && chain.len() < 4 * MAX_PATH {
            let link = self.links[at as usize];
            chain.push(link.addr);
            at = link.parent;
        }
        chain.reverse();
        let of_class = self.type_of(chain[0]).is_some_and(|t| t.kind == Kind::Type);
        let mut steps = Vec::new();
        for pair in chain.windows(2) {
            let edge = self.edge(pair[0], pair[1]);
            let name = edge.and_then(|e| self.step(e)).unwrap_or_else(|| "?".into());
            steps.push(Step { name });
        }
        let mut root = self.roots[root as usize].clone();
        let first = steps.first().map(|s| s.name.clone()).unwrap_or_default();
        if root.kind == "global" && of_class && first.starts_with('.') {
            // A global class's attribute: `Class.attr`.
            root = Root { kind: "class", name: format!("{}{first}", root.name), scope: root.scope };
            steps.remove(0);
        } else if let Some(variable) = first.strip_prefix("(closure ").and_then(|v| v.strip_suffix(')')) {
            // A closure's variable, the function that keeps it its scope.
            root = Root { kind: "closure", name: variable.to_owned(), scope: Some(root.name) };
            steps.remove(0);
            // The cell's contents: the variable's value.
            if steps.first().is_some_and(|s| s.name == ".cell_contents") {
                steps.remove(0);
            }
        }
        steps.truncate(MAX_PATH);
        (root, steps)
    }
}

/// A C string of at most 128 bytes (a type's name).
fn c_string(mem: &dyn Memory, at: u64) -> Option<String> {
    let mut buf = [0u8; 128];
    let n = mem.read_into(at, &mut buf)?;
    let end = buf[..n].iter().position(|b| *b == 0)?;
    std::str::from_utf8(&buf[..end]).ok().map(str::to_owned)
}

/// The CPython `pid` runs (its mappings `maps`, opened through its `root`), or why none
/// can be walked, in one line.
pub fn interpreter(pid: u32, maps: &[crate::procfs::Mapping], root: &std::path::Path) -> Result<Interpreter> {
    match Interpreter::find(maps, root) {
        Some(Ok(py)) => Ok(py),
        Some(Err(why)) => anyhow::bail!("pid {pid}: {why}"),
        None => anyhow::bail!("pid {pid} runs no CPython leakmon knows"),
    }
}
