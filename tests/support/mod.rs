//! What the tests that run real `drl` processes share: scratch directories,
//! ports that no client connection can take, one-shot HTTP requests, and
//! node logs kept in a file for the failure message.
#![allow(dead_code)] // each test binary uses its own part of this module

pub mod cluster;
pub mod procs;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The `drl` binary of this build.
pub const DRL: &str = env!("CARGO_BIN_EXE_drl");

/// A fresh, empty directory under the system's temporary directory, unique
/// to this process and call.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drl-test-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The lowest port the kernel hands out to outgoing connections (and to
/// binds on port 0).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// `n` consecutive ports, each free for both TCP and UDP on 127.0.0.1; the
/// first is returned.
///
/// A port taken by binding port 0 and closing the socket lies in the
/// kernel's ephemeral range: while a node starts, any outgoing connection
/// of a concurrent test (a load loop opens thousands) may take it as its
/// local port, and the node then fails to bind. These ports come from
/// below that range, which connections never use, from a counter shared by
/// the tests of this process and started at an offset of the process id so
/// that test binaries run side by side rarely meet; a port still in use is
/// skipped.
pub fn free_ports(n: u32) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let high = ephemeral_low().clamp(12_000, 65_000);
    let low = 10_000;
    let span = high - low;
    let _ = NEXT.compare_exchange(
        0,
        1 + (std::process::id() * 7_919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let at = NEXT.fetch_add(n, Ordering::Relaxed) % span;
        if at + n > span {
            continue;
        }
        let base = low + at;
        if (base..base + n).all(|p| port_free(p as u16)) {
            return base as u16;
        }
    }
    panic!("no {n} consecutive free ports below {high}");
}

/// One port free for both TCP and UDP (see [`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(1)
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// One HTTP/1.1 request on a fresh connection, with `Bearer tok` as the
/// admin token; the status code and the whole response text.
pub fn request(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer tok\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    Some((code, text))
}

/// The status code of one request (see [`request`]).
pub fn status(port: u16, method: &str, path: &str, body: &str) -> Option<u16> {
    request(port, method, path, body).map(|(code, _)| code)
}

/// Whether the node on `port` answers `/readyz` with 200.
pub fn ready(port: u16) -> bool {
    status(port, "GET", "/readyz", "") == Some(200)
}

/// A file to send a child's stderr to, appended across restarts, so that a
/// failure can show what the node said.
pub fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .into()
}

/// The last `lines` lines of a log file, for a failure message.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How a child process ended, or that it still runs.
pub fn exit_state(child: &mut Child) -> String {
    match child.try_wait() {
        Ok(Some(status)) => format!("exited: {status}"),
        Ok(None) => "running".into(),
        Err(e) => format!("unknown: {e}"),
    }
}

/// Sends `sig` (`-STOP`, `-CONT`, `-KILL`…) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Sends SIGCONT to its process when dropped, so a failed assertion never
/// leaves a node stopped.
pub struct Resume(pub u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}
