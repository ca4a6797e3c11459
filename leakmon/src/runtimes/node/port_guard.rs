//! Keeps a debugger port leakmon opens to root and the process's own user.
//!
//! A Node.js inspector on loopback takes any local connection, and a connection is the
//! process: its user's code runs through it. While leakmon holds one open, a hook on
//! every `connect` in the host (cgroup v2's `connect4`/`connect6`, attached at the root
//! of the hierarchy beside any other programs there) refuses connections to that port
//! on loopback from anyone but root and the port's process's user, who can reach the
//! process already. The port is guarded before the signal that opens it and until it is
//! closed; the hooks go with leakmon (their link is its descriptor), by which time the
//! runtime guardian has closed the port (see [`super::super::guardian`]).

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    sync::{Mutex, PoisonError},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::HashMap,
    programs::{CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use leakmon_common::port_guard::{CONNECT4, CONNECT6, PORTS_MAP};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leakmon-port-guard"));

/// The hooks, loaded on first use and kept while leakmon runs; each port's holders.
static INSTALLED: Mutex<Option<Installed>> = Mutex::new(None);

struct Installed {
    ebpf: Ebpf,
    holders: StdHashMap<u16, usize>,
}

/// One port guarded until dropped.
#[derive(Debug)]
pub struct PortGuard {
    port: u16,
}

impl PortGuard {
    /// Lets only root and `owner` connect to `port` on loopback from now on.
    pub fn hold(port: u16, owner: u32) -> Result<Self> {
        let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
        if installed.is_none() {
            *installed = Some(install()?);
        }
        let Some(guard) = installed.as_mut() else { unreachable!("installed above") };
        let mut ports: HashMap<_, u32, u32> = HashMap::try_from(
            guard.ebpf.map_mut(PORTS_MAP).ok_or_else(|| anyhow!("the port guard has no {PORTS_MAP} map"))?,
        )?;
        if let Ok(other) = ports.get(&u32::from(port), 0) {
            if other != owner {
                bail!("port {port} is held open for uid {other} already: leakmon opens no second inspector on it");
            }
        }
        ports.insert(&u32::from(port), &owner, 0).with_context(|| format!("guard port {port}"))?;
        *guard.holders.entry(port).or_default() += 1;
        Ok(Self { port })
    }
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(guard) = installed.as_mut() else { return };
        let Some(count) = guard.holders.get_mut(&self.port) else { return };
        *count -= 1;
        if *count > 0 {
            return;
        }
        guard.holders.remove(&self.port);
        if let Some(Ok(mut ports)) = guard.ebpf.map_mut(PORTS_MAP).map(HashMap::<_, u32, u32>::try_from) {
            let _ = ports.remove(&u32::from(self.port));
        }
    }
}

/// Loads the hooks and attaches them at the root of the cgroup v2 hierarchy.
fn install() -> Result<Installed> {
    if OBJECT.is_empty() {
        bail!("this leakmon was built without its eBPF objects; build it with `cargo xtask build`");
    }
    let root = cgroup2_root().ok_or_else(|| {
        anyhow!(
            "no cgroup v2 hierarchy is mounted, so leakmon cannot keep an inspector's port to root and the process's user: not opened"
        )
    })?;
    let mut ebpf = Ebpf::load(OBJECT).context("load the port guard")?;
    for name in [CONNECT4, CONNECT6] {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the port guard has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name} is not a cgroup socket-address program"))?;
        program.load().with_context(|| format!("load {name}"))?;
        let dir = File::open(&root).with_context(|| format!("open {root}"))?;
        // A link (every kernel leakmon runs on has them) always runs beside the other
        // programs attached there, and the kernel refuses any flag on it: `Single` is
        // aya's "no flag", not a claim to the hierarchy.
        program.attach(dir, CgroupAttachMode::Single).with_context(|| format!("attach {name} at {root}"))?;
    }
    Ok(Installed { ebpf, holders: StdHashMap::new() })
}

/// Where the cgroup v2 hierarchy is mounted (its first mount in our namespace),
/// read as any kernel text is (`read_text`): other users' mounts (FUSE) are listed there
/// under paths of any bytes.
fn cgroup2_root() -> Option<String> {
    let mounts = crate::untrusted::read_text(
        std::path::Path::new("/proc/self/mountinfo"),
        crate::untrusted::PROC_TEXT_LIMIT,
    )
    .ok()?;
    mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(str::to_owned))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
    use std::os::unix::process::CommandExt as _;

    /// Whether `uid` can connect to `host`:`port`, tried from a bash that drops to it.
    fn connects(uid: u32, host: &str, port: u16) -> bool {
        std::process::Command::new("/bin/bash")
            .args(["-c", &format!("exec 3<>/dev/tcp/{host}/{port}")])
            .uid(uid)
            .gid(uid)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("bash")
            .success()
    }

    #[test]
    fn a_guarded_port_takes_root_and_its_owner_only() {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = v4.local_addr().unwrap().port();
        assert!(connects(65534, "127.0.0.1", port), "nobody cannot connect unguarded");
        let guard = PortGuard::hold(port, 65534).expect("guard");
        assert!(connects(65534, "127.0.0.1", port), "the port's own user was refused");
        for host in ["127.0.0.1", "::ffff:127.0.0.1"] {
            assert!(!connects(1, host, port), "another user reached the guarded port at {host}");
        }
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok(), "root was refused");
        assert!(
            TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port))).is_ok(),
            "root was refused on ::ffff:127.0.0.1"
        );
        // The same port on IPv6's loopback, where the host has one.
        if let Ok(_v6) = TcpListener::bind((Ipv6Addr::LOCALHOST, port)) {
            assert!(!connects(1, "::1", port), "another user reached the guarded port at ::1");
        }
        drop(guard);
        assert!(connects(1, "127.0.0.1", port), "the port stayed guarded once released");
    }
}
