//! The bounds of heap blocks leakmon did not see allocated, from glibc malloc's own
//! chunk headers: blocks allocated before a window began, and with the agent every
//! block it did not sample. A chain from a root to a block seen often passes through
//! such blocks (a list's older nodes); without their bounds it would break there, and
//! the block would pass for lost.
//!
//! glibc keeps, in the word before each block, its chunk's size with three flags in the
//! low bits (the previous chunk in use; the chunk mapped on its own; a thread arena's).
//! Chunks of the main arena lie end to end in `[heap]`, the last one the free top;
//! each large block is a mapping of its own. Threads' arenas (64 MiB heaps of their
//! own, headed by arena metadata) are not walked yet: blocks there that leakmon did not
//! see hold nothing on the way.
//!
//! Freed chunks kept in glibc's per-thread caches and fast bins look in use: their
//! stale bytes are followed as a block's are. So these blocks only carry reach from a
//! root onward (see [`super::reach::Block::known`]): a block is never called lost
//! because of them.

use super::reach::{word, Block, Memory};

const PREV_INUSE: u64 = 1;
const IS_MMAPPED: u64 = 2;
const FLAGS: u64 = 7;
/// The word before a block, and the chunk's first (the previous chunk's size).
const WORD: u64 = 8;
/// The smallest chunk.
const MIN_CHUNK: u64 = 32;
/// Bytes of chunk headers read at once while walking.
const WINDOW: usize = 1 << 20;

/// The bytes a block at `start` may hold, from its chunk's header: glibc's usable size.
/// `None` where the header is no chunk's (not glibc's heap, or unreadable).
pub fn usable(memory: &dyn Memory, start: u64) -> Option<u64> {
    let header = word(memory, start.checked_sub(WORD)?)?;
    let size = header & !FLAGS;
    if size < MIN_CHUNK || !size.is_multiple_of(16) {
        return None;
    }
    // A mapped chunk has no next chunk to lend its first word.
    Some(if header & IS_MMAPPED != 0 { size - 2 * WORD } else { size - WORD })
}

/// The blocks glibc's chunk headers give in the mappings of `maps` (the text of
/// `/proc/PID/maps`): the main arena's `[heap]`, and anonymous mappings that are
/// mapped chunks. Unknown blocks ([`Block::known`] false), in address order; `None`
/// when `go_on` stopped the walk, or past [`MAX_BLOCKS`] (the headers are the
/// process's to forge: a walk is bounded by the scan's budget and leakmon's memory).
pub fn glibc_blocks(memory: &dyn Memory, maps: &str, go_on: &mut dyn FnMut() -> bool) -> Option<Vec<Block>> {
    let mut out = Vec::new();
    for r in super::roots::regions(maps) {
        if !r.writable {
            continue;
        }
        let (s, e) = (r.start, r.end);
        let done = match r.name.as_str() {
            "[heap]" => walk_heap(memory, s, e, &mut out, go_on),
            "" => mapped_chunks(memory, s, e, &mut out, go_on),
            _ => true,
        };
        if !done || out.len() > MAX_BLOCKS {
            return None;
        }
    }
    Some(out)
}

/// How a walk of chunks ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Walk {
    /// At the top chunk, which ends the heap.
    Top,
    /// At a header that is no chunk's.
    Broken,
    /// Out of time.
    Stopped,
}

/// Blocks taken from the headers at most (24 bytes each in leakmon): a process of tens
/// of millions of small chunks, or one that forges them, is not followed past it.
pub const MAX_BLOCKS: usize = 1 << 22;

/// Chunks walked between two looks at the budget.
const STEPS: u32 = 4096;

/// The main arena's chunks, end to end from its first chunk; a chunk is in use when
/// the next one says so. The first chunk is the first place from which chunks lead
/// to the heap's end: a static program keeps its main thread's TLS at the heap's
/// start, before malloc's first chunk.
fn walk_heap(
    memory: &dyn Memory,
    start: u64,
    end: u64,
    out: &mut Vec<Block>,
    go_on: &mut dyn FnMut() -> bool,
) -> bool {
    let mut headers = Headers { memory, end, window: vec![0u8; WINDOW], at: 0, len: 0 };
    let first = start.next_multiple_of(16);
    for c in (0..MAX_PREFIX / 16).map(|i| first + 16 * i).take_while(|c| c + 2 * WORD <= end) {
        match headers.walk(c, go_on, &mut |_, _| {}) {
            Walk::Broken => continue,
            Walk::Stopped => return false,
            Walk::Top => {
                let room = std::cell::Cell::new(true);
                let walked = headers.walk(c, &mut || room.get() && go_on(), &mut |chunk, size| {
                    out.push(Block { start: chunk + 2 * WORD, size: size - WORD, known: false });
                    room.set(out.len() <= MAX_BLOCKS);
                });
                return walked != Walk::Stopped;
            }
        }
    }
    true
}

/// Bytes before malloc's first chunk in `[heap]` looked through for it.
const MAX_PREFIX: u64 = 64 << 10;

/// Chunk headers of one heap, read a window at a time.
struct Headers<'a> {
    memory: &'a dyn Memory,
    end: u64,
    window: Vec<u8>,
    at: u64,
    len: usize,
}

impl Headers<'_> {
    fn header(&mut self, at: u64) -> Option<u64> {
        if at < self.at || at + 8 > self.at + self.len as u64 {
            self.at = at;
            let len = (self.end - at).min(WINDOW as u64) as usize;
            self.len = self.memory.read_into(at, &mut self.window[..len])?;
        }
        let i = (at - self.at) as usize;
        Some(u64::from_le_bytes(self.window.get(i..i + 8)?.try_into().ok()?))
    }

    /// Walks chunks from `chunk`, calling `in_use` with each chunk in use and its size;
    /// whether the walk ended with the top chunk at the heap's end.
    fn walk(
        &mut self,
        mut chunk: u64,
        go_on: &mut dyn FnMut() -> bool,
        in_use: &mut dyn FnMut(u64, u64),
    ) -> Walk {
        let mut previous: Option<(u64, u64)> = None;
        let mut steps = 0u32;
        while chunk + 2 * WORD <= self.end {
            steps += 1;
            if steps.is_multiple_of(STEPS) && !go_on() {
                return Walk::Stopped;
            }
            let Some(h) = self.header(chunk + WORD) else { return Walk::Broken };
            let size = h & !FLAGS;
            if size < MIN_CHUNK || !size.is_multiple_of(16) || size > self.end - chunk || h & IS_MMAPPED != 0
            {
                return Walk::Broken;
            }
            // The previous chunk was in use if this one says so.
            if let Some((p, psize)) = previous.take() {
                if h & PREV_INUSE != 0 {
                    in_use(p, psize);
                }
            }
            // The chunk that ends the heap is the top, free (glibc keeps the break
            // on a page, the heap's end).
            if chunk + size == self.end {
                return Walk::Top;
            }
            previous = Some((chunk, size));
            chunk += size;
        }
        Walk::Broken
    }
}

/// Mapped chunks laid end to end in one anonymous mapping (the kernel merges
/// neighbouring mappings): each headed by a size with the mapped flag, page sized.
fn mapped_chunks(
    memory: &dyn Memory,
    start: u64,
    end: u64,
    out: &mut Vec<Block>,
    go_on: &mut dyn FnMut() -> bool,
) -> bool {
    let mut chunk = start;
    let mut steps = 0u32;
    while chunk + 2 * WORD <= end {
        steps += 1;
        if steps.is_multiple_of(STEPS) && !go_on() {
            return false;
        }
        let Some(h) = word(memory, chunk + WORD) else { return true };
        let size = h & !FLAGS;
        if h & IS_MMAPPED == 0 || size == 0 || !size.is_multiple_of(4096) || size > end - chunk {
            return true;
        }
        out.push(Block { start: chunk + 2 * WORD, size: size - 2 * WORD, known: false });
        chunk += size;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holders::reach::tests::Words;
    use std::collections::HashMap;

    /// A heap of three chunks and the top: the first in use, the second free (the
    /// third says so), the third in use (the top says so).
    #[test]
    fn the_heap_walk_keeps_chunks_in_use_and_stops_at_the_top() {
        let heap = 0x55_0000_0000u64;
        let mut m = HashMap::new();
        m.insert(heap + 8, 0x30 | PREV_INUSE);
        m.insert(heap + 0x30 + 8, 0x40 | PREV_INUSE);
        m.insert(heap + 0x70 + 8, 0x20);
        m.insert(heap + 0x90 + 8, (0x1000 - 0x90) | PREV_INUSE);
        let maps = format!("{:x}-{:x} rw-p 00000000 00:00 0 [heap]\n", heap, heap + 0x1000);
        let blocks = glibc_blocks(&Words::from(m), &maps, &mut || true).expect("walked");
        assert_eq!(
            blocks,
            [
                Block { start: heap + 16, size: 0x28, known: false },
                Block { start: heap + 0x70 + 16, size: 0x18, known: false },
            ]
        );
    }

    #[test]
    fn mapped_chunks_and_usable_sizes() {
        let at = 0x7f00_0000_0000u64;
        let mut m = HashMap::new();
        m.insert(at + 8, 0x2000 | IS_MMAPPED);
        m.insert(at + 0x2000 + 8, 0x1000 | IS_MMAPPED);
        let maps = format!("{:x}-{:x} rw-p 00000000 00:00 0\n", at, at + 0x4000);
        let memory = Words::from(m);
        let blocks = glibc_blocks(&memory, &maps, &mut || true).expect("walked");
        assert_eq!(
            blocks,
            [
                Block { start: at + 16, size: 0x2000 - 16, known: false },
                Block { start: at + 0x2010, size: 0x1000 - 16, known: false },
            ],
            "the third page heads no chunk"
        );
        assert_eq!(usable(&memory, at + 16), Some(0x2000 - 16));
        let mut m = HashMap::new();
        m.insert(0x1008, 0x40 | PREV_INUSE);
        assert_eq!(usable(&Words::from(m), 0x1010), Some(0x38));
        assert_eq!(usable(&Words::default(), 0x1010), None);
    }

    /// A static program's TLS at the heap's start comes before malloc's first chunk:
    /// the walk starts where chunks lead to the heap's end.
    #[test]
    fn the_heap_walk_finds_the_first_chunk_past_a_prefix() {
        let heap = 0x55_0000_0000u64;
        let mut m = HashMap::new();
        // 0x120 bytes of TLS and thread control block, with words that look like sizes.
        m.insert(heap + 8, 0x7777);
        m.insert(heap + 0x48, 0x40);
        let first = heap + 0x120;
        m.insert(first + 8, 0x30 | PREV_INUSE);
        m.insert(first + 0x30 + 8, (0x1000 - 0x150) | PREV_INUSE);
        let maps = format!("{:x}-{:x} rw-p 00000000 00:00 0 [heap]\n", heap, heap + 0x1000);
        assert_eq!(
            glibc_blocks(&Words::from(m), &maps, &mut || true).expect("walked"),
            [Block { start: first + 16, size: 0x28, known: false }]
        );
    }

    /// The headers are the process's to forge: sizes that would wrap the address
    /// space end the walk, and a walk runs only while the budget lasts.
    #[test]
    fn forged_headers_end_the_walk_or_the_budget_does() {
        let heap = 0x55_0000_0000u64;
        let mut m = HashMap::new();
        m.insert(heap + 8, !FLAGS);
        let maps = format!("{:x}-{:x} rw-p 00000000 00:00 0 [heap]\n", heap, heap + 0x1000);
        assert_eq!(glibc_blocks(&Words::from(m), &maps, &mut || true), Some(vec![]));
        let at = 0x7f00_0000_0000u64;
        let m = HashMap::from([(at + 8, !0xfff | IS_MMAPPED)]);
        let maps = format!("{:x}-{:x} rw-p 00000000 00:00 0\n", at, at + 0x4000);
        assert_eq!(glibc_blocks(&Words::from(m), &maps, &mut || true), Some(vec![]));
        // A heap of 10,000 smallest chunks, walked with no time left.
        let m: HashMap<u64, u64> = (0..10_000u64).map(|i| (heap + 32 * i + 8, 32 | PREV_INUSE)).collect();
        let maps = format!("{:x}-{:x} rw-p 00000000 00:00 0 [heap]\n", heap, heap + 32 * 10_000);
        assert_eq!(glibc_blocks(&Words::from(m), &maps, &mut || false), None);
    }
}
