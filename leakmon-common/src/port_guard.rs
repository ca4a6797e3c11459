//! The port guard: while leakmon holds a debugger port open in a process (Node.js's
//! inspector), connections to that port on loopback are let through only for root and
//! the process's own user, by a hook on every `connect` in the host.

/// Ports guarded at once.
pub const MAX_PORTS: u32 = 64;

/// The map of guarded ports (host byte order) → the uid that may connect besides root.
pub const PORTS_MAP: &str = "GUARDED_PORTS";

/// The hooks' names, for IPv4 and IPv6 `connect`.
pub const CONNECT4: &str = "port_guard_connect4";
pub const CONNECT6: &str = "port_guard_connect6";
