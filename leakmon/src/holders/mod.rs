//! Lost, or still held, and by whom (`report --holders`, under way): whether a
//! running process still reaches each unfreed block, and through which root and chain.
//!
//! - [`reach`]: the flood over blocks, roots and memory, and memcheck's classes. Pure:
//!   the stop of the process, its roots and its memory come from elsewhere.
//! - [`roots`]: where a stopped process keeps pointers by definition (data, bss,
//!   thread stacks), from its mappings and its threads' stack pointers.

pub mod reach;
pub mod roots;
