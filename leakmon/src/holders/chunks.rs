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

use super::reach::{Block, Memory};

const PREV_INUSE: u64 = 1;
const IS_MMAPPED: u64 = 2;
const FLAGS: u64 = 7;
/// The word before a block, and the chunk's first (the previous chunk's size).
const WORD: u64 = 8;
/// The smallest chunk.
const MIN_CHUNK: u64 = 32;
/// Chunk headers read at once while walking.
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

fn word(memory: &dyn Memory, at: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    (memory.read_into(at, &mut b)? == 8).then(|| u64::from_le_bytes(b))
}

/// The blocks glibc's chunk headers give in the mappings of `maps` (the text of
/// `/proc/PID/maps`): the main arena's `[heap]`, and anonymous mappings that are
/// mapped chunks. Unknown blocks ([`Block::known`] false), in address order.
pub fn glibc_blocks(memory: &dyn Memory, maps: &str) -> Vec<Block> {
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let name = fields.nth(3).unwrap_or("");
        let Some((s, e)) = range.split_once('-') else { continue };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else { continue };
        if !perms.starts_with("rw") {
            continue;
        }
        match name {
            "[heap]" => walk_heap(memory, s, e, &mut out),
            "" => mapped_chunks(memory, s, e, &mut out),
            _ => {}
        }
    }
    out
}

/// The main arena's chunks, end to end from the heap's start; a chunk is in use when
/// the next one says so. Stops at the top chunk, or at a header that is no chunk's.
fn walk_heap(memory: &dyn Memory, start: u64, end: u64, out: &mut Vec<Block>) {
    let mut window = vec![0u8; WINDOW];
    let mut window_at = 0u64;
    let mut window_len = 0usize;
    let mut header = |at: u64| -> Option<u64> {
        if at < window_at || at + 8 > window_at + window_len as u64 {
            window_at = at;
            let len = (end - at).min(WINDOW as u64) as usize;
            window_len = memory.read_into(at, &mut window[..len])?;
        }
        let i = (at - window_at) as usize;
        Some(u64::from_le_bytes(window.get(i..i + 8)?.try_into().ok()?))
    };
    // The first chunk is aligned so that its block is: 16 bytes.
    let mut chunk = start.next_multiple_of(16);
    let mut previous: Option<(u64, u64)> = None;
    while chunk + 2 * WORD <= end {
        let Some(h) = header(chunk + WORD) else { break };
        let size = h & !FLAGS;
        if size < MIN_CHUNK || !size.is_multiple_of(16) || chunk + size > end || h & IS_MMAPPED != 0 {
            break;
        }
        // The previous chunk was in use if this one says so.
        if let Some((p, psize)) = previous.take() {
            if h & PREV_INUSE != 0 {
                out.push(Block { start: p + 2 * WORD, size: psize - WORD, known: false });
            }
        }
        previous = Some((chunk, size));
        chunk += size;
    }
    // The last chunk walked is the top, free.
}

/// Mapped chunks laid end to end in one anonymous mapping (the kernel merges
/// neighbouring mappings): each headed by a size with the mapped flag, page sized.
fn mapped_chunks(memory: &dyn Memory, start: u64, end: u64, out: &mut Vec<Block>) {
    let mut chunk = start;
    while chunk + 2 * WORD <= end {
        let Some(h) = word(memory, chunk + WORD) else { return };
        let size = h & !FLAGS;
        if h & IS_MMAPPED == 0 || size == 0 || !size.is_multiple_of(4096) || chunk + size > end {
            return;
        }
        out.push(Block { start: chunk + 2 * WORD, size: size - 2 * WORD, known: false });
        chunk += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Sparse(HashMap<u64, u64>);
    impl Memory for Sparse {
        fn read_into(&self, start: u64, buf: &mut [u8]) -> Option<usize> {
            for (i, chunk) in buf.chunks_mut(8).enumerate() {
                let word = self.0.get(&(start + 8 * i as u64)).copied().unwrap_or(0).to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            Some(buf.len())
        }
    }

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
        let blocks = glibc_blocks(&Sparse(m), &maps);
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
        let memory = Sparse(m);
        let blocks = glibc_blocks(&memory, &maps);
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
        assert_eq!(usable(&Sparse(m), 0x1010), Some(0x38));
        assert_eq!(usable(&Sparse(HashMap::new()), 0x1010), None);
    }
}
