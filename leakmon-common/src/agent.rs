//! What leakmon and its in-process agent agree on for inline hooks: how many hook
//! slots the agent has, and what each slot's kind tells its hook about the hooked
//! function's arguments. build.rs writes these into the agent's C header.

/// Inline hook slots in the agent: distinct allocator entry points one process can
/// have hooked at once (the C family, and a jemalloc's prefixed copies of it).
pub const INLINE_SLOTS: usize = 32;

/// The agent's set of sampled blocks: `2^SET_BITS` addresses.
pub const SET_BITS: u32 = 20;
/// The counting filter in front of it: one byte a slot.
pub const FILTER_SLOTS: u64 = 1 << 16;
/// The freestanding agent's per-thread states: `2^THREAD_BITS` slots.
pub const THREAD_BITS: u32 = 12;
/// Bytes of one per-thread slot (key, countdown, random state, busy flag).
pub const THREAD_SLOT_BYTES: u64 = 32;

/// The freestanding agent's tables, in one mapping leakmon makes for it: the set,
/// the filter, the per-thread states, in that order.
#[must_use]
pub const fn table_bytes() -> [u64; 3] {
    [8 << SET_BITS, FILTER_SLOTS, THREAD_SLOT_BYTES << THREAD_BITS]
}

/// How a hooked function takes and returns its block, as the agent's hook reads it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// `(size, ..) -> block`: malloc, valloc, mallocx.
    Malloc = 0,
    /// `(count, size) -> block`.
    Calloc = 1,
    /// `(block, size, ..) -> block`: realloc, rallocx.
    Realloc = 2,
    /// `(count, size)` more than realloc: reallocarray.
    ReallocArray = 3,
    /// `(alignment, size) -> block`: `memalign`, `aligned_alloc`.
    Memalign = 4,
    /// `(&block, alignment, size) -> 0 on success`.
    PosixMemalign = 5,
    /// `(string, ..) -> copy`.
    Strdup = 6,
    /// `(block, ..)`: free, sdallocx, dallocx.
    Free = 7,
}

impl HookKind {
    pub const ALL: [HookKind; 8] = [
        HookKind::Malloc,
        HookKind::Calloc,
        HookKind::Realloc,
        HookKind::ReallocArray,
        HookKind::Memalign,
        HookKind::PosixMemalign,
        HookKind::Strdup,
        HookKind::Free,
    ];

    /// The C name build.rs gives the kind in the agent's header.
    #[must_use]
    pub fn c_name(self) -> &'static str {
        match self {
            HookKind::Malloc => "K_MALLOC",
            HookKind::Calloc => "K_CALLOC",
            HookKind::Realloc => "K_REALLOC",
            HookKind::ReallocArray => "K_REALLOCARRAY",
            HookKind::Memalign => "K_MEMALIGN",
            HookKind::PosixMemalign => "K_POSIX_MEMALIGN",
            HookKind::Strdup => "K_STRDUP",
            HookKind::Free => "K_FREE",
        }
    }

    /// The kind of an allocator entry point an inline hook may go on, by its symbol:
    /// the C family, and the same under jemalloc's prefixes (`je_` when bundled, as in
    /// Redis; `_rjem_` in Rust's jemalloc crates).
    #[must_use]
    pub fn of_symbol(name: &str) -> Option<HookKind> {
        let base = name.strip_prefix("je_").or_else(|| name.strip_prefix("_rjem_")).unwrap_or(name);
        Some(match base {
            "malloc" | "valloc" | "pvalloc" | "mallocx" => HookKind::Malloc,
            "calloc" => HookKind::Calloc,
            "realloc" | "rallocx" => HookKind::Realloc,
            "reallocarray" => HookKind::ReallocArray,
            "memalign" | "aligned_alloc" => HookKind::Memalign,
            "posix_memalign" => HookKind::PosixMemalign,
            "free" | "cfree" | "free_sized" | "free_aligned_sized" | "dallocx" | "sdallocx" => HookKind::Free,
            _ => return None,
        })
    }
}
