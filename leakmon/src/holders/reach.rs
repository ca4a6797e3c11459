//! Which unfreed blocks a process still reaches, and from where: the flood of
//! valgrind memcheck and LeakSanitizer, over memory read from outside.
//!
//! In: the blocks (start and size, sorted, not overlapping), the roots (ranges of the
//! process's memory that are live by definition: registers, thread stacks, TLS, the
//! writable data of mapped objects) and a reader of the process's memory. Every
//! aligned word of a root, and of each block reached, is taken for a pointer if it
//! falls inside a block: at its start (a start pointer) or past it (an interior one).
//!
//! Out, per block, memcheck's classes:
//! - **reachable**: a chain of start pointers leads to it from a root;
//! - **possibly lost**: chains lead to it, each through at least one interior pointer;
//! - **indirectly lost**: only lost blocks point at it;
//! - **definitely lost**: nothing points at it (the first block of a lost clique).
//!
//! For each block reached, its holder: the root and the chain of blocks the flood
//! first came through (breadth first, so the shortest).

use std::collections::VecDeque;

/// Memcheck's classes, in the order a flood raises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    DefinitelyLost,
    IndirectlyLost,
    PossiblyLost,
    Reachable,
}

/// A block the process has not freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub start: u64,
    pub size: u64,
    /// Seen allocated (and not freed), rather than taken from the allocator's headers
    /// (see [`super::chunks`]), which may be a freed chunk's: such a block carries
    /// reach from a root onward, but heads no lost clique, so it never makes a block
    /// indirectly lost.
    pub known: bool,
}

/// A range of the process's memory that holds pointers by definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    pub start: u64,
    pub end: u64,
}

/// What reached a block first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A word of root `root` at `at`.
    Root { root: usize, at: u64 },
    /// A word of block `block`.
    Block { block: usize },
}

/// The process's memory, read from outside: `None` where it cannot be read (unmapped,
/// or gone); what could not be read holds no pointer.
pub trait Memory {
    /// Fills `buf` from `start`: the bytes read (fewer where a mapping ends).
    fn read_into(&self, start: u64, buf: &mut [u8]) -> Option<usize>;

    fn read(&self, start: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = self.read_into(start, &mut buf)?;
        buf.truncate(n);
        Some(buf)
    }
}

/// The word at `at`, where all 8 bytes read.
pub fn word(memory: &dyn Memory, at: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    (memory.read_into(at, &mut b)? == 8).then(|| u64::from_le_bytes(b))
}

/// The outcome, per block in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    pub class: Vec<Class>,
    pub via: Vec<Option<Via>>,
    /// Words read, roots and blocks: the scan's size.
    pub words: u64,
    /// Whether the flood ran to its end. A flood stopped early (its budget spent) has
    /// reached too little: what it calls lost may be held, so its classes are no verdict.
    pub complete: bool,
}

impl Reach {
    /// The chain from a root to block `b`: the root and its word's address, then the
    /// blocks in order, `b` last. `None` for a block no root reaches.
    pub fn chain(&self, b: usize) -> Option<(usize, u64, Vec<usize>)> {
        let mut path = vec![b];
        let mut at = b;
        // A chain visits each block once: no longer than the blocks.
        for _ in 0..self.via.len() {
            match self.via[at]? {
                Via::Root { root, at: word } => {
                    path.reverse();
                    return Some((root, word, path));
                }
                Via::Block { block } => {
                    path.push(block);
                    at = block;
                }
            }
        }
        None
    }
}

/// The block of `blocks` (sorted by start) that `word` points into, and whether at its
/// start.
fn target(blocks: &[Block], word: u64) -> Option<(usize, bool)> {
    let i = blocks.partition_point(|b| b.start <= word).checked_sub(1)?;
    let b = blocks[i];
    (word < b.start.saturating_add(b.size.max(1))).then_some((i, word == b.start))
}

/// Bytes read at once: a block of a GiB is not read into one buffer.
const CHUNK: u64 = 1 << 20;

/// Calls `f` with each aligned word of `len` bytes at `start` that points into the
/// span of `blocks` (where any of them lies; the rest can hold no pointer to one) and
/// its address (a tail shorter than a word is none), while `go_on` says so. Returns
/// the words read, and whether it got to the end.
fn each_word(
    memory: &dyn Memory,
    buf: &mut [u8],
    (start, len): (u64, u64),
    blocks: &[Block],
    go_on: &mut dyn FnMut() -> bool,
    mut f: impl FnMut(u64, u64),
) -> (u64, bool) {
    let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else { return (0, true) };
    let span = first.start..last.start.saturating_add(last.size.max(1));
    let aligned = start.next_multiple_of(8);
    let Some(len) = len.checked_sub(aligned - start) else { return (0, true) };
    let end = aligned + (len & !7);
    let mut at = aligned;
    let mut read = 0;
    while at < end {
        if !go_on() {
            return (read, false);
        }
        let n = (end - at).min(CHUNK);
        // What cannot be read holds no pointer.
        if let Some(got) = memory.read_into(at, &mut buf[..n as usize]) {
            let words = buf[..got].as_chunks::<8>().0;
            read += words.len() as u64;
            for (i, w) in words.iter().enumerate() {
                let word = u64::from_le_bytes(*w);
                if span.contains(&word) {
                    f(at + 8 * i as u64, word);
                }
            }
        }
        at += n;
    }
    (read, true)
}

/// Floods `blocks` (sorted by start, not overlapping) from `roots`, while `go_on` says
/// so (asked before each chunk of memory read: the scan's budget).
pub fn flood(
    blocks: &[Block],
    roots: &[Root],
    memory: &dyn Memory,
    go_on: &mut dyn FnMut() -> bool,
) -> Reach {
    debug_assert!(
        blocks.windows(2).all(|w| w[0].start.saturating_add(w[0].size) <= w[1].start),
        "sorted, apart"
    );
    let n = blocks.len();
    let mut class = vec![Class::DefinitelyLost; n];
    let mut reached = vec![false; n];
    let mut via = vec![None; n];
    let mut queue = VecDeque::new();
    let mut count = 0u64;
    // Raises block `b` to `to` if that is higher; a raised block is scanned (again).
    let mut raise = |b: usize, to: Class, from: Via, class: &mut Vec<Class>, queue: &mut VecDeque<usize>| {
        if !reached[b] || to > class[b] {
            // The holder of a block reachable is on its start-pointer chain.
            if !reached[b] || to == Class::Reachable {
                via[b] = Some(from);
            }
            reached[b] = true;
            class[b] = to;
            queue.push_back(b);
        }
    };
    let mut complete = true;
    // One buffer for every read: a fresh one each time would cost page faults per chunk.
    let mut buf = vec![0u8; CHUNK as usize];
    for (r, root) in roots.iter().enumerate() {
        let range = (root.start, root.end.saturating_sub(root.start));
        let (read, done) = each_word(memory, &mut buf, range, blocks, go_on, |at, word| {
            if let Some((b, start)) = target(blocks, word) {
                let to = if start { Class::Reachable } else { Class::PossiblyLost };
                raise(b, to, Via::Root { root: r, at }, &mut class, &mut queue);
            }
        });
        count += read;
        complete &= done;
        if !complete {
            break;
        }
    }
    while let Some(b) = queue.pop_front().filter(|_| complete) {
        let holder = class[b];
        let (read, done) =
            each_word(memory, &mut buf, (blocks[b].start, blocks[b].size), blocks, go_on, |_, word| {
                if let Some((t, start)) = target(blocks, word) {
                    if t != b {
                        let to = if start && holder == Class::Reachable {
                            Class::Reachable
                        } else {
                            Class::PossiblyLost
                        };
                        raise(t, to, Via::Block { block: b }, &mut class, &mut queue);
                    }
                }
            });
        count += read;
        complete &= done;
    }
    drop(raise);
    if complete {
        complete = lost(blocks, memory, &mut buf, &reached, &mut class, &mut count, go_on);
    }
    Reach { class, via, words: count, complete }
}

/// What no root reaches is lost: each block another lost block points at is
/// indirectly lost; the rest, the heads of what was dropped, definitely.
fn lost(
    blocks: &[Block],
    memory: &dyn Memory,
    buf: &mut [u8],
    reached: &[bool],
    class: &mut [Class],
    count: &mut u64,
    go_on: &mut dyn FnMut() -> bool,
) -> bool {
    // The head whose flood last took each block in (1 + its index; 0: none yet).
    let mut taken = vec![0usize; blocks.len()];
    for b in 0..blocks.len() {
        // A block an earlier head's flood took in is no head (a lost cycle's first
        // block heads it); nor is one not known to be allocated.
        if reached[b] || class[b] == Class::IndirectlyLost || !blocks[b].known {
            continue;
        }
        taken[b] = b + 1;
        let mut stack = vec![b];
        while let Some(l) = stack.pop() {
            let (read, done) =
                each_word(memory, buf, (blocks[l].start, blocks[l].size), blocks, go_on, |_, word| {
                    if let Some((t, _)) = target(blocks, word) {
                        if !reached[t] && taken[t] != b + 1 {
                            class[t] = Class::IndirectlyLost;
                            taken[t] = b + 1;
                            stack.push(t);
                        }
                    }
                });
            *count += read;
            if !done {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A sparse memory of words, zero elsewhere.
    #[derive(Default)]
    pub(crate) struct Words(BTreeMap<u64, u64>);

    impl Words {
        pub(crate) fn put(&mut self, at: u64, value: u64) {
            self.0.insert(at, value);
        }
    }

    impl<I: IntoIterator<Item = (u64, u64)>> From<I> for Words {
        fn from(words: I) -> Self {
            Self(words.into_iter().collect())
        }
    }

    impl Memory for Words {
        fn read_into(&self, start: u64, buf: &mut [u8]) -> Option<usize> {
            for (i, chunk) in buf.chunks_mut(8).enumerate() {
                let word = self.0.get(&(start + 8 * i as u64)).copied().unwrap_or(0).to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            Some(buf.len())
        }
    }

    const HEAP: u64 = 0x10_0000;
    const DATA: u64 = 0x1000;

    fn block(i: u64) -> Block {
        Block { start: HEAP + i * 0x100, size: 64, known: true }
    }

    /// The shapes of memcheck's manual: a global list, a forgotten block, a dropped
    /// tree, a block held only through an interior pointer, a lost cycle.
    #[test]
    fn memchecks_classes() {
        let blocks: Vec<Block> = (0..10).map(block).collect();
        let mut m = Words::default();
        // A global points at list node 0, which points at 1, which points at 2.
        m.put(DATA, block(0).start);
        m.put(block(0).start + 8, block(1).start);
        m.put(block(1).start + 8, block(2).start);
        // 3: forgotten, nothing points at it.
        // 4 is a dropped tree's root holding 5 and 6.
        m.put(block(4).start, block(5).start);
        m.put(block(4).start + 16, block(6).start);
        // 7: held only by a pointer 24 bytes into it.
        m.put(DATA + 8, block(7).start + 24);
        // 8 and 9 point at each other, and nothing else at them.
        m.put(block(8).start, block(9).start);
        m.put(block(9).start, block(8).start);
        let reach = flood(&blocks, &[Root { start: DATA, end: DATA + 64 }], &m, &mut || true);
        use Class::*;
        assert_eq!(
            reach.class,
            [
                Reachable,
                Reachable,
                Reachable,
                DefinitelyLost,
                DefinitelyLost,
                IndirectlyLost,
                IndirectlyLost,
                PossiblyLost,
                DefinitelyLost,
                IndirectlyLost
            ]
        );
        assert_eq!(reach.chain(2), Some((0, DATA, vec![0, 1, 2])), "rooted at the global, through the list");
        assert_eq!(reach.chain(7), Some((0, DATA + 8, vec![7])));
        assert_eq!(reach.chain(3), None);
    }

    /// A lost block that points at an earlier lost head makes it indirectly lost: only
    /// the block nothing points at is definitely lost.
    #[test]
    fn a_later_head_takes_in_an_earlier_one() {
        let blocks: Vec<Block> = (0..3).map(block).collect();
        let mut m = Words::default();
        m.put(block(0).start, block(1).start);
        m.put(block(2).start, block(0).start);
        let reach = flood(&blocks, &[], &m, &mut || true);
        assert_eq!(reach.class, [Class::IndirectlyLost, Class::IndirectlyLost, Class::DefinitelyLost]);
    }

    /// A block reached first through an interior pointer, then through a chain of start
    /// pointers, is reachable, and its holder is that chain.
    #[test]
    fn a_start_pointer_chain_wins_over_an_earlier_interior_one() {
        let blocks: Vec<Block> = (0..3).map(block).collect();
        let mut m = Words::default();
        m.put(DATA, block(2).start + 8);
        m.put(DATA + 8, block(0).start);
        m.put(block(0).start, block(1).start);
        m.put(block(1).start, block(2).start);
        let reach = flood(&blocks, &[Root { start: DATA, end: DATA + 16 }], &m, &mut || true);
        assert_eq!(reach.class, [Class::Reachable; 3]);
        assert_eq!(reach.chain(2), Some((0, DATA + 8, vec![0, 1, 2])));
    }

    /// What a possibly-lost block points at is possibly lost, never reachable.
    #[test]
    fn an_interior_pointer_taints_the_chain_below_it() {
        let blocks: Vec<Block> = (0..2).map(block).collect();
        let mut m = Words::default();
        m.put(DATA, block(0).start + 8);
        m.put(block(0).start + 16, block(1).start);
        let reach = flood(&blocks, &[Root { start: DATA, end: DATA + 8 }], &m, &mut || true);
        assert_eq!(reach.class, [Class::PossiblyLost; 2]);
    }

    /// Unaligned roots and unreadable memory hold no pointer; a word just past a block
    /// is not in it.
    #[test]
    fn only_aligned_readable_words_inside_a_block_count() {
        struct Nothing;
        impl Memory for Nothing {
            fn read_into(&self, _: u64, _: &mut [u8]) -> Option<usize> {
                None
            }
        }
        let blocks = [block(0)];
        let reach = flood(&blocks, &[Root { start: DATA, end: DATA + 64 }], &Nothing, &mut || true);
        assert_eq!(reach.class, [Class::DefinitelyLost]);
        let mut m = Words::default();
        m.put(DATA, block(0).start + 64);
        assert_eq!(
            flood(&blocks, &[Root { start: DATA, end: DATA + 8 }], &m, &mut || true).class,
            [Class::DefinitelyLost]
        );
        m.put(DATA + 8, block(0).start + 63);
        let reach = flood(&blocks, &[Root { start: DATA + 3, end: DATA + 16 }], &m, &mut || true);
        assert_eq!(reach.class, [Class::PossiblyLost], "the word at DATA+8, the first aligned one");
    }

    /// A flood whose budget runs out says so, and stops reading.
    #[test]
    fn a_spent_budget_stops_the_flood_and_says_so() {
        let blocks: Vec<Block> = (0..3).map(block).collect();
        let mut m = Words::default();
        m.put(DATA, block(0).start);
        m.put(block(0).start, block(1).start);
        m.put(block(1).start, block(2).start);
        let roots = [Root { start: DATA, end: DATA + 8 }];
        let mut asked = 0;
        let reach = flood(&blocks, &roots, &m, &mut || {
            asked += 1;
            asked <= 2
        });
        assert!(!reach.complete);
        assert_eq!(reach.words, 1 + 8, "the root's word and block 0's eight, no more");
        assert!(flood(&blocks, &roots, &m, &mut || true).complete);
    }

    /// Blocks taken from the allocator's headers carry reach from a root (a list's
    /// older nodes), but one that nothing reaches (a freed chunk's stale bytes) makes
    /// no block indirectly lost.
    #[test]
    fn unknown_blocks_carry_reach_but_head_nothing() {
        let mut blocks: Vec<Block> = (0..4).map(block).collect();
        blocks[1].known = false;
        blocks[3].known = false;
        let mut m = Words::default();
        m.put(DATA, block(1).start);
        m.put(block(1).start, block(0).start);
        m.put(block(3).start, block(2).start);
        let reach = flood(&blocks, &[Root { start: DATA, end: DATA + 8 }], &m, &mut || true);
        assert_eq!(reach.class[0], Class::Reachable);
        assert_eq!(reach.chain(0), Some((0, DATA, vec![1, 0])));
        assert_eq!(reach.class[2], Class::DefinitelyLost, "a stale pointer in an unknown block is none");
    }
}
