//! leakmon's own heap in use, as its allocator counts it. The resident size alone
//! cannot tell a leak from the high-water mark the allocator keeps after a busy moment,
//! or from the pages of mapped binaries and debug files that symbolizing touches.

/// Bytes handed out by glibc's malloc and not freed: the arenas' chunks in use plus the
/// chunks that have mappings of their own. `None` on other C libraries.
pub fn heap_in_use() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and only reads the allocator's state
        // under its own locks.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Gives the heap's free memory back to the system (glibc keeps it for reuse); called
/// after a large release, such as the symbolizer's parsed binaries.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only works on the allocator's own state, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_block_is_counted_until_it_is_freed() {
        // Other tests allocate on their threads meanwhile: a measurement they disturbed
        // is taken again (a broken count fails every attempt).
        let mut seen = Vec::new();
        for _ in 0..5 {
            let before = heap_in_use().expect("glibc");
            let block = vec![1u8; 64 << 20];
            let held = heap_in_use().expect("glibc");
            drop(std::hint::black_box(block));
            let after = heap_in_use().expect("glibc");
            if held >= before + (64 << 20) && after < held - (48 << 20) {
                return;
            }
            seen.push((before, held, after));
        }
        panic!("a 64 MiB block was not counted while held and uncounted once freed: {seen:?}");
    }
}
