//! Lost, or still held, and by whom (`report --holders`): whether a running process
//! still reaches each unfreed block, and through which root and chain.
//!
//! - [`stop`]: every thread of a process held still with ptrace, and let go on every
//!   path (the kernel lets go of a killed tracer's tracees itself).
//! - [`roots`]: where a stopped process keeps pointers by definition (data, bss,
//!   thread stacks), from its mappings and its threads' stack pointers.
//! - [`chunks`]: the bounds of blocks leakmon did not see allocated, from glibc
//!   malloc's chunk headers.
//! - [`reach`]: the flood over blocks, roots and memory, and memcheck's classes. Pure.
//! - [`scan`]: one scan: the stop, the roots (registers and TLS too), the flood within
//!   a budget, the findings per allocation stack.
//! - [`names`]: the findings named once the process runs again, as the report shows
//!   them.

pub mod chunks;
pub mod names;
pub mod reach;
pub mod roots;
pub mod scan;
pub mod stop;

/// The longest pause a holders scan takes unless told otherwise: a native scan's, and
/// a runtime's (a Node.js heap snapshot, JFR's search for paths), for the report and
/// the daemon alike.
pub const NATIVE_BUDGET_MS: u32 = 2000;
pub const RUNTIME_BUDGET_MS: u32 = 30_000;
