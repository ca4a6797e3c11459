//! Node.js's inspector, reached the way `node inspect -p PID` reaches it: SIGUSR1
//! opens it (on 127.0.0.1:9229 unless the process chose another port), its HTTP
//! endpoint names the WebSocket of the process's one target, and the Chrome DevTools
//! Protocol runs over that socket.
//!
//! Everything here runs in the target's network namespace (the caller's thread joins
//! it first), where the inspector listens.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

/// Longest wait for one protocol answer (a sampling profile of a large heap takes a
/// while to build).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The TCP ports `pid` listens on (IPv4 and IPv6), as addresses to connect to (one
/// bound to every address is reached through loopback).
pub fn listening(pid: u32) -> Result<Vec<SocketAddr>> {
    Ok(listeners(pid)?.into_iter().map(reach).collect())
}

/// The addresses `pid`'s TCP ports are bound to, from its network namespace's socket
/// tables, keeping the sockets its own descriptors hold.
pub fn listeners(pid: u32) -> Result<Vec<SocketAddr>> {
    let mut inodes = std::collections::HashSet::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).with_context(|| format!("read /proc/{pid}/fd"))?;
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = crate::untrusted::read_text(
            std::path::Path::new(&format!("/proc/{pid}/net/{table}")),
            crate::untrusted::PROC_TEXT_LIMIT,
        ) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local address, remote, state (0A: LISTEN), ..., inode at 9.
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                if let Some(addr) = socket_addr(cols[1]) {
                    out.push(addr);
                }
            }
        }
    }
    Ok(out)
}

/// `0100007F:2405` (the kernel's hex, address bytes in host order) as an address.
fn socket_addr(hex: &str) -> Option<SocketAddr> {
    let (ip, port) = hex.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes()).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, word) in bytes.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?.swap_bytes();
                word.copy_from_slice(&w.to_be_bytes());
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Where to connect to a socket bound to `addr`: an unspecified address through
/// loopback.
fn reach(addr: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Where a Node.js's inspector would listen, as its options name it.
#[derive(Debug, PartialEq, Eq)]
pub struct InspectorAddress {
    /// `None` where the options name none (Node.js binds 127.0.0.1).
    pub host: Option<String>,
    pub port: u16,
}

/// Node.js's inspector port when its options name none.
pub const DEFAULT_INSPECTOR_PORT: u16 = 9229;

/// Where a Node.js's inspector would listen, from its options
/// (`--inspect[-brk|-port|-wait]=[HOST:]PORT` or `=HOST`, `--debug-port`) on its command
/// line or in `NODE_OPTIONS`. As in Node.js, each option sets what it names and keeps
/// the rest: `--inspect=0.0.0.0:1 --inspect-port=2` listens on 0.0.0.0:2.
pub fn inspector_address<'a>(args: impl IntoIterator<Item = &'a str>) -> InspectorAddress {
    let mut address = InspectorAddress { host: None, port: DEFAULT_INSPECTOR_PORT };
    for arg in args {
        let Some((flag, value)) = arg.split_once('=') else { continue };
        if !["--inspect", "--inspect-brk", "--inspect-port", "--debug-port", "--inspect-wait"].contains(&flag)
        {
            continue;
        }
        if let Ok(port) = value.parse::<u16>() {
            address.port = port;
            continue;
        }
        let host = match value.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => {
                address.port = port.parse().unwrap_or(address.port);
                host
            }
            _ => value,
        };
        address.host = Some(host.trim_start_matches('[').trim_end_matches(']').to_owned());
    }
    address
}

/// Whether `host` (as an inspector option names it) is this machine's loopback.
pub fn loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The body of `GET path` on `addr`, or `None` when nothing answers HTTP there.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    // Read up to the body's announced length, or to the end: a server may keep the
    // connection open after its answer.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&raw);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
            });
            if length.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    }
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_owned())
}

/// Whether an inspector answers at `addr` (its `/json/version` names a Node.js).
pub fn is_inspector(addr: SocketAddr) -> bool {
    http_get(addr, "/json/version")
        .and_then(|body| serde_json::from_str::<Value>(&body).ok())
        .is_some_and(|v| v["Browser"].as_str().is_some_and(|b| b.starts_with("node.js")))
}

/// A protocol session with the process's one target.
pub struct Session {
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl Session {
    /// Connects to the target the inspector at `addr` lists.
    pub fn open(addr: SocketAddr) -> Result<Self> {
        let list =
            http_get(addr, "/json/list").ok_or_else(|| anyhow!("the inspector at {addr} lists no target"))?;
        let targets: Value = serde_json::from_str(&list).context("parse the inspector's target list")?;
        let url = targets[0]["webSocketDebuggerUrl"]
            .as_str()
            .ok_or_else(|| anyhow!("the inspector at {addr} gives no WebSocket URL"))?
            .to_owned();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect to the inspector at {addr}"))?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT)).context("set a read timeout")?;
        let (socket, _) = tungstenite::client(url.as_str(), stream)
            .map_err(|e| anyhow!("open the inspector's WebSocket {url}: {e}"))?;
        Ok(Self { socket, next_id: 1 })
    }

    /// Calls `method` and returns its result; events that come meanwhile are dropped.
    pub fn call(&mut self, method: &str, params: &Value) -> Result<Value> {
        self.call_with(method, params, ANSWER_TIMEOUT, &mut |_, _| Ok(()))
    }

    /// Calls `method` and returns its result, within `timeout`; each event that comes
    /// meanwhile goes to `on_event` (its method and parameters), which may end the call
    /// with an error.
    pub fn call_with(
        &mut self,
        method: &str,
        params: &Value,
        timeout: Duration,
        on_event: &mut dyn FnMut(&str, &Value) -> Result<()>,
    ) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .map_err(|e| anyhow!("send {method} to the inspector: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if Instant::now() > deadline {
                bail!("the inspector did not answer {method} within {timeout:?}");
            }
            let message =
                self.socket.read().map_err(|e| anyhow!("read the inspector's answer to {method}: {e}"))?;
            let tungstenite::Message::Text(text) = message else { continue };
            let answer: Value = serde_json::from_str(text.as_str()).context("parse an inspector message")?;
            if let Some(event) = answer["method"].as_str() {
                on_event(event, &answer["params"])?;
                continue;
            }
            if answer["id"] != id {
                continue;
            }
            if let Some(error) = answer.get("error") {
                bail!(
                    "the inspector refused {method}: {}",
                    error["message"].as_str().unwrap_or("no reason given")
                );
            }
            return Ok(answer["result"].clone());
        }
    }

    /// Ends the session.
    pub fn close(mut self) {
        let _ = self.socket.close(None);
        let _ = self.socket.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_socket_addresses() {
        assert_eq!(socket_addr("0100007F:2405"), Some("127.0.0.1:9221".parse().unwrap()));
        assert_eq!(socket_addr("00000000:1F90"), Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(reach("0.0.0.0:8080".parse().unwrap()), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(reach("[::]:8080".parse().unwrap()), "[::1]:8080".parse().unwrap());
        assert_eq!(socket_addr("00000000000000000000000001000000:2405"), Some("[::1]:9221".parse().unwrap()));
        assert_eq!(socket_addr("junk"), None);
    }

    #[test]
    fn the_inspector_s_address_is_read_from_node_s_options() {
        let at = |args: &[&str]| {
            let a = inspector_address(args.iter().copied());
            (a.host, a.port)
        };
        let host = |h: &str| Some(h.to_owned());
        assert_eq!(at(&["node", "app.js"]), (None, 9229));
        assert_eq!(at(&["node", "--inspect-port=9230", "app.js"]), (None, 9230));
        assert_eq!(at(&["--inspect-port=0.0.0.0:9229"]), (host("0.0.0.0"), 9229));
        assert_eq!(at(&["--inspect=[::]:9228"]), (host("::"), 9228));
        assert_eq!(at(&["--inspect=example.org"]), (host("example.org"), 9229));
        assert_eq!(at(&["--inspect-port=0.0.0.0:1", "--inspect-port=127.0.0.1:2"]), (host("127.0.0.1"), 2));
        // A later option naming only the port keeps the host named before it.
        assert_eq!(at(&["--inspect=0.0.0.0:1", "--inspect-port=2"]), (host("0.0.0.0"), 2));
        assert_eq!(at(&["--inspect=0"]), (None, 0));
        assert!(loopback("127.0.0.1") && loopback("::1") && loopback("localhost"));
        assert!(!loopback("0.0.0.0") && !loopback("::") && !loopback("10.0.0.1") && !loopback("example.org"));
    }
}
