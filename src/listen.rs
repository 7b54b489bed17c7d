//! What every TCP listener of a node shares (HTTP, the operations port,
//! RESP): sockets spread over threads with `SO_REUSEPORT`, one accept loop
//! per thread on its own single-threaded runtime, and connection caps in
//! all and per source address ([`Gate`]). The protocol front-ends only say
//! how to serve one connection.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// Most connections a decision listener holds open at once over all its
/// threads (the default of `ServerLimits::max_connections`).
pub const MAX_CONNECTIONS: usize = 16_384;

/// How many threads serve a listener (HTTP, RESP): one per core, at most 16.
pub fn serve_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16)
}

/// A listening socket with `SO_REUSEPORT`, so that each HTTP thread has its
/// own and the kernel spreads connections over them.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// The accept loop of one listener thread, shared by the HTTP and RESP
/// listeners: a single-threaded runtime accepts until `draining` turns true,
/// admits each connection through `gate` (over a cap it is closed at once,
/// so the client learns now rather than after a timeout in the backlog),
/// and serves it as a task made by `serve`; then it waits for the open
/// connections to finish.
pub fn accept_loop<F, Fut>(
    listener: std::net::TcpListener,
    gate: Arc<Gate>,
    mut draining: watch::Receiver<bool>,
    protocol: &'static str,
    mut serve: F,
) -> io::Result<()>
where
    F: FnMut(TcpStream, Ticket, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        let mut connections = tokio::task::JoinSet::new();
        let for_connections = draining.clone();
        loop {
            tokio::select! {
                _ = draining.wait_for(|d| *d) => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Some(ticket) = gate.admit(peer.ip()) else {
                            drop(stream);
                            continue;
                        };
                        // Answers are small: send them at once rather than
                        // after the peer's delayed ACK.
                        let _ = stream.set_nodelay(true);
                        connections.spawn(serve(stream, ticket, for_connections.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(error = %e, protocol, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
        Ok(())
    })
}

/// Connection caps of one listener: in all, and per source address.
pub struct Gate {
    max: usize,
    max_per_source: usize,
    open: AtomicUsize,
    by_source: DashMap<IpAddr, usize>,
}

impl Gate {
    /// At most `max` connections, `max_per_source` from one address (each
    /// at least 1).
    pub fn new(max: usize, max_per_source: usize) -> Gate {
        Gate {
            max: max.max(1),
            max_per_source: max_per_source.max(1),
            open: AtomicUsize::new(0),
            by_source: DashMap::new(),
        }
    }

    /// A ticket for one more connection from `source`, or `None` when a cap
    /// is reached.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Ticket> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut count = self.by_source.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            drop(count);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *count += 1;
        drop(count);
        Some(Ticket {
            gate: self.clone(),
            source,
        })
    }
}

/// One admitted connection; gives its place back when dropped.
pub struct Ticket {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.by_source.remove_if_mut(&self.source, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_each_source_and_the_total() {
        let gate = Arc::new(Gate::new(3, 2));
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let t1 = gate.admit(a).unwrap();
        let t2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "per-source cap");
        let t3 = gate.admit(b).unwrap();
        assert!(gate.admit(b).is_none(), "total cap");
        drop(t1);
        let t4 = gate.admit(a).unwrap();
        drop((t2, t3, t4));
        assert_eq!(gate.open.load(Ordering::Relaxed), 0);
        assert!(
            gate.by_source.is_empty(),
            "no entry is left for a gone source"
        );
    }
}
