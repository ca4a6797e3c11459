//! The port guard's hooks (see `leakmon_common::port_guard`): a `connect` to a guarded
//! port on loopback is refused (EPERM) unless root or the port's process's own user
//! makes it. Everything else passes untouched.
//!
//! A program of its own, apart from the allocation probes: `report --runtime` loads only
//! this, and the hooks cost one table lookup per `connect` on the host.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_current_uid_gid,
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};
use leakmon_common::port_guard::MAX_PORTS;

/// Guarded port (host byte order) → the uid allowed besides root.
#[map]
static GUARDED_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PORTS, 0);

const LET_THROUGH: i32 = 1;
const REFUSE: i32 = 0;

/// Whether a connection to `port` (network byte order, as the kernel gives it), on a
/// loopback address, may go on.
fn allowed(port: u32) -> i32 {
    let port = u32::from(u16::from_be(port as u16));
    // SAFETY: a lookup in our own map; the value is read at once.
    let Some(&owner) = (unsafe { GUARDED_PORTS.get(&port) }) else { return LET_THROUGH };
    let uid = bpf_get_current_uid_gid() as u32;
    if uid == 0 || uid == owner {
        LET_THROUGH
    } else {
        REFUSE
    }
}

#[cgroup_sock_addr(connect4)]
pub fn port_guard_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid context; fields are read whole, as it requires.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // 127.0.0.0/8, in network byte order.
    if u32::from_be(ip) >> 24 != 127 {
        return LET_THROUGH;
    }
    allowed(port)
}

#[cgroup_sock_addr(connect6)]
pub fn port_guard_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip6, (*ctx.sock_addr).user_port) };
    let words = [u32::from_be(ip[0]), u32::from_be(ip[1]), u32::from_be(ip[2]), u32::from_be(ip[3])];
    // ::1, or an IPv4 loopback address written as IPv6 (::ffff:127.x.y.z).
    let loopback = words[0] == 0
        && words[1] == 0
        && ((words[2] == 0 && words[3] == 1) || (words[2] == 0xffff && words[3] >> 24 == 127));
    if !loopback {
        return LET_THROUGH;
    }
    allowed(port)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
