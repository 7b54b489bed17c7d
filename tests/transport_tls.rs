//! The peer transport over real QUIC sockets on 127.0.0.1: who may connect,
//! what arrives, and what a hostile peer cannot do.

use std::net::SocketAddr;
use std::time::Duration;

use drl::net::certs::{self_signed_node_cert, ClusterCa, NodeCert, NodeCertSpec};
use drl::net::{
    close_code, slot_server_name, Incoming, NodeTls, SendError, Transport, TransportError, Via,
    CLUSTER_SERVER_NAME,
};
use tokio::sync::mpsc::Receiver;
use tokio::time::{sleep, timeout, Instant};

const WAIT: Duration = Duration::from_secs(4);
/// How long a refused peer is watched for a connection that must not come.
const REFUSAL_WINDOW: Duration = Duration::from_millis(1500);
const LOCALHOST: &str = "127.0.0.1:0";

fn spec(slot: u16) -> NodeCertSpec {
    NodeCertSpec {
        name: format!("node-{slot}"),
        slot,
        hosts: Vec::new(),
    }
}

fn tls(ca_pem: &str, cert: &NodeCert) -> NodeTls {
    NodeTls::from_pem(
        ca_pem.as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
    )
    .expect("TLS material loads")
}

fn member(ca: &ClusterCa, slot: u16) -> NodeTls {
    tls(ca.cert_pem(), &ca.issue(&spec(slot)).expect("issue"))
}

struct Node {
    transport: Transport,
    events: Receiver<Incoming>,
    addr: SocketAddr,
}

fn start(tls: NodeTls, slot: u16) -> Node {
    start_at(tls, slot, LOCALHOST.parse().expect("address"))
}

fn start_at(tls: NodeTls, slot: u16, listen: SocketAddr) -> Node {
    // `RUST_LOG=drl=debug` shows why a connection was refused.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (transport, events) = Transport::bind(listen, tls, slot).expect("bind");
    let addr = transport.local_addr().expect("local address");
    Node {
        transport,
        events,
        addr,
    }
}

/// The next event that `pick` accepts, skipping others; panics after `WAIT`.
async fn expect_event<T>(
    events: &mut Receiver<Incoming>,
    what: &str,
    mut pick: impl FnMut(&Incoming) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            events.recv(),
        )
        .await
        {
            Ok(Some(event)) => {
                if let Some(found) = pick(&event) {
                    return found;
                }
            }
            Ok(None) => panic!("event queue closed while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

async fn expect_connected(events: &mut Receiver<Incoming>, slot: u16) -> SocketAddr {
    expect_event(
        events,
        &format!("Connected {{ slot: {slot} }}"),
        |event| match event {
            Incoming::Connected { slot: s, addr } if *s == slot => Some(*addr),
            _ => None,
        },
    )
    .await
}

async fn expect_frame(events: &mut Receiver<Incoming>, from: u16, reliable: bool) -> Vec<u8> {
    expect_event(events, &format!("frame from {from}"), |event| match event {
        Incoming::Frame {
            from: f,
            bytes,
            reliable: r,
        } if *f == from && *r == reliable => Some(bytes.clone()),
        _ => None,
    })
    .await
}

/// Fails on any connection or frame within `REFUSAL_WINDOW`.
async fn expect_nothing(events: &mut Receiver<Incoming>, who: &str) {
    let deadline = Instant::now() + REFUSAL_WINDOW;
    while let Ok(event) = timeout(
        deadline.saturating_duration_since(Instant::now()),
        events.recv(),
    )
    .await
    {
        match event {
            None => return,
            Some(Incoming::Disconnected { .. }) => {}
            Some(event) => panic!("{who} got {event:?}"),
        }
    }
}

/// Sends a datagram frame until it arrives (datagrams may be lost even on
/// loopback) and checks its bytes.
async fn datagram_arrives(from: &Node, from_slot: u16, to: &mut Node, to_slot: u16) {
    let bytes = format!("delta {from_slot}->{to_slot}").into_bytes();
    for _ in 0..10 {
        assert_eq!(
            from.transport.send(to_slot, bytes.clone()).expect("send"),
            Via::Datagram
        );
        let got = timeout(
            Duration::from_millis(300),
            expect_frame(&mut to.events, from_slot, false),
        )
        .await;
        if let Ok(got) = got {
            assert_eq!(got, bytes);
            return;
        }
    }
    panic!("no datagram arrived from {from_slot} at {to_slot}");
}

async fn stream_arrives(from: &Node, from_slot: u16, to: &mut Node, to_slot: u16) {
    let bytes: Vec<u8> = (0..200_000u32)
        .map(|i| (i * 7 + from_slot as u32) as u8)
        .collect();
    assert_eq!(
        from.transport.send(to_slot, bytes.clone()).expect("send"),
        Via::Stream
    );
    assert_eq!(expect_frame(&mut to.events, from_slot, true).await, bytes);
}

/// The ten-byte announcement of the slot exchange: slot, then instance.
fn announcement(slot: u16, instance: u64) -> Vec<u8> {
    let mut bytes = slot.to_be_bytes().to_vec();
    bytes.extend_from_slice(&instance.to_be_bytes());
    bytes
}

/// A hand-made client that speaks the slot exchange itself, claiming
/// whatever slot (and instance) it likes.
async fn raw_dial(
    tls: &NodeTls,
    to: SocketAddr,
    server_name: &str,
    claim: u16,
    instance: u64,
) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = quinn::Endpoint::client(LOCALHOST.parse().expect("address")).expect("client");
    let conn = endpoint
        .connect_with(tls.client_config(), to, server_name)
        .expect("connect")
        .await
        .expect("TLS handshake");
    let mut announce = conn.open_uni().await.expect("open");
    announce
        .write_all(&announcement(claim, instance))
        .await
        .expect("announce");
    announce.finish().expect("finish");
    (endpoint, conn)
}

/// The slot the node at the other end of `conn` announced.
async fn announced_slot(conn: &quinn::Connection) -> u16 {
    let mut stream = conn.accept_uni().await.expect("announcement stream");
    let bytes = stream.read_to_end(10).await.expect("announcement");
    assert_eq!(bytes.len(), 10);
    u16::from_be_bytes([bytes[0], bytes[1]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_peers_exchange_datagrams_and_streams_both_ways() {
    let ca = ClusterCa::generate().expect("ca");
    let mut a = start(member(&ca, 1), 1);
    let mut b = start(member(&ca, 2), 2);
    a.transport.set_peers(vec![(2, b.addr)]);
    b.transport.set_peers(vec![(1, a.addr)]);
    assert_eq!(expect_connected(&mut a.events, 2).await, b.addr);
    assert_eq!(expect_connected(&mut b.events, 1).await, a.addr);
    assert_eq!(a.transport.connected(), vec![2]);
    assert_eq!(b.transport.connected(), vec![1]);

    datagram_arrives(&a, 1, &mut b, 2).await;
    datagram_arrives(&b, 2, &mut a, 1).await;
    stream_arrives(&a, 1, &mut b, 2).await;
    stream_arrives(&b, 2, &mut a, 1).await;

    let stats = a.transport.stats(2).expect("stats");
    assert!(stats.udp_tx_bytes > 200_000 && stats.udp_rx_bytes > 200_000);
    assert!(stats.udp_tx_datagrams > 0 && stats.rtt > Duration::ZERO);
    assert!(a.transport.max_datagram_size(2).expect("datagrams") >= 1000);
    assert!(a.transport.stats(3).is_none());
    assert!(matches!(
        a.transport.send(3, vec![1]),
        Err(SendError::NotConnected(3))
    ));
    assert!(matches!(
        a.transport.send(2, vec![0; (1 << 20) + 1]),
        Err(SendError::TooLarge { .. })
    ));

    // Forgetting the peer closes the dialed connection; B's dialed one
    // stays, so A still sees slot 2.
    b.transport.set_peers(Vec::new());
    sleep(Duration::from_millis(200)).await;
    assert_eq!(a.transport.connected(), vec![2]);
    a.transport.set_peers(Vec::new());
    expect_event(&mut a.events, "Disconnected { slot: 2 }", |event| {
        (*event == Incoming::Disconnected { slot: 2 }).then_some(())
    })
    .await;
    assert!(a.transport.connected().is_empty());
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_dial_learns_and_verifies_the_slot() {
    let ca = ClusterCa::generate().expect("ca");
    let mut a = start(member(&ca, 1), 1);
    let mut b = start(member(&ca, 2), 2);
    // A seed list often holds the node itself: that address is dropped.
    a.transport.connect_seed(a.addr);
    a.transport.connect_seed(b.addr);
    assert_eq!(expect_connected(&mut a.events, 2).await, b.addr);
    expect_connected(&mut b.events, 1).await;
    assert_eq!(a.transport.connected(), vec![2]);

    // B never dialed A: it answers over the connection A made.
    datagram_arrives(&a, 1, &mut b, 2).await;
    datagram_arrives(&b, 2, &mut a, 1).await;
    stream_arrives(&a, 1, &mut b, 2).await;
    stream_arrives(&b, 2, &mut a, 1).await;
    let peer_cert = b.transport.peer_certificate(1).expect("certificate");
    drl::net::verify_cert_name(&peer_cert, "node-1").expect("node name");
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_listed_while_its_seed_dial_is_under_way_is_reached_through_it() {
    // What a restarting node does: it dials its seeds, and the membership
    // names the same peer before the seed has answered. The listing waits
    // for the seed dial instead of starting a second one, and the seed's
    // connection becomes the slot's dialed link.
    let ca = ClusterCa::generate().expect("ca");
    let mut a = start(member(&ca, 1), 1);
    let mut b = start(member(&ca, 2), 2);
    a.transport.connect_seed(b.addr);
    a.transport.set_peers(vec![(2, b.addr)]);
    assert_eq!(expect_connected(&mut a.events, 2).await, b.addr);
    expect_connected(&mut b.events, 1).await;
    datagram_arrives(&a, 1, &mut b, 2).await;
    datagram_arrives(&b, 2, &mut a, 1).await;
    stream_arrives(&b, 2, &mut a, 1).await;
    assert_eq!(a.transport.connected(), vec![2]);
    // One connection reached B, not one per dial (a second dial would have
    // finished long before this on loopback).
    sleep(Duration::from_millis(300)).await;
    let accepted = b.transport.admission_stats();
    assert_eq!(
        accepted.accepted_known + accepted.accepted_unknown,
        1,
        "{accepted:?}"
    );
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialer_reconnects_after_the_peer_restarts() {
    let ca = ClusterCa::generate().expect("ca");
    let b_tls = member(&ca, 2);
    let mut a = start(member(&ca, 1), 1);
    let b = start(b_tls.clone(), 2);
    let b_addr = b.addr;
    a.transport.set_peers(vec![(2, b_addr)]);
    expect_connected(&mut a.events, 2).await;

    b.transport.shutdown().await;
    drop(b);
    expect_event(&mut a.events, "Disconnected { slot: 2 }", |event| {
        (*event == Incoming::Disconnected { slot: 2 }).then_some(())
    })
    .await;
    // The old socket closes once its last task has finished.
    let restarted = Instant::now();
    let mut b = loop {
        match Transport::bind(b_addr, b_tls.clone(), 2) {
            Ok((transport, events)) => {
                break Node {
                    transport,
                    events,
                    addr: b_addr,
                }
            }
            Err(_) if restarted.elapsed() < WAIT => sleep(Duration::from_millis(20)).await,
            Err(error) => panic!("restart: {error}"),
        }
    };
    expect_connected(&mut a.events, 2).await;
    datagram_arrives(&a, 1, &mut b, 2).await;
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

/// Watches both sides of an attempted join that must fail.
async fn refused_both_ways(member: &mut Node, intruder: &mut Node) {
    // Seeds first: a seed whose address is already listed is not dialed.
    member.transport.connect_seed(intruder.addr);
    intruder.transport.connect_seed(member.addr);
    intruder.transport.set_peers(vec![(1, member.addr)]);
    member.transport.set_peers(vec![(2, intruder.addr)]);
    tokio::join!(
        expect_nothing(&mut member.events, "member"),
        expect_nothing(&mut intruder.events, "intruder"),
    );
    assert!(member.transport.connected().is_empty());
    assert!(intruder.transport.connected().is_empty());
    assert!(matches!(
        intruder.transport.send(1, b"inject".to_vec()),
        Err(SendError::NotConnected(1))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_from_a_foreign_ca_is_refused() {
    let ca = ClusterCa::generate().expect("ca");
    let foreign = ClusterCa::generate().expect("foreign ca");
    let mut a = start(member(&ca, 1), 1);
    // Consistent with its own CA: refused because the CAs differ.
    let mut b = start(member(&foreign, 2), 2);
    refused_both_ways(&mut a, &mut b).await;
    // Trusts the cluster CA, presents a foreign certificate: the cluster
    // refuses the client certificate.
    let mixed = tls(ca.cert_pem(), &foreign.issue(&spec(3)).expect("issue"));
    let mut c = start(mixed, 3);
    c.transport.connect_seed(a.addr);
    c.transport.set_peers(vec![(1, a.addr)]);
    tokio::join!(
        expect_nothing(&mut a.events, "member"),
        expect_nothing(&mut c.events, "intruder"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_node_is_refused() {
    let ca = ClusterCa::generate().expect("ca");
    let mut a = start(member(&ca, 1), 1);
    let forged = self_signed_node_cert(&spec(2)).expect("self-signed");
    // It trusts the cluster CA, so only its own certificate is at fault.
    let mut b = start(tls(ca.cert_pem(), &forged), 2);
    refused_both_ways(&mut a, &mut b).await;
    // Even trusting itself as a CA changes nothing.
    let mut c = start(tls(&forged.cert_pem, &forged), 2);
    refused_both_ways(&mut a, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_claiming_another_slot_is_refused() {
    let ca = ClusterCa::generate().expect("ca");
    let mut a = start(member(&ca, 1), 1);
    let slot3 = member(&ca, 3);

    // Our own transport will not even start under a slot its certificate
    // does not prove.
    let wrong = Transport::bind(LOCALHOST.parse().expect("address"), slot3.clone(), 2);
    assert!(matches!(
        wrong.map(|_| ()),
        Err(TransportError::CertificateNotForSlot { slot: 2, .. })
    ));

    // A client with a valid slot-3 certificate announcing slot 2.
    let (_endpoint, conn) = raw_dial(&slot3, a.addr, &slot_server_name(1), 2, 7).await;
    match timeout(WAIT, conn.closed()).await.expect("closed by A") {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(close_code::IDENTITY)
            );
        }
        other => panic!("closed with {other}"),
    }

    // A server with a valid slot-3 certificate announcing slot 2: dialed as
    // slot 2, TLS fails; dialed as a seed, the announcement is refused.
    let impostor = quinn::Endpoint::server(slot3.server_config(), LOCALHOST.parse().expect("a"))
        .expect("impostor server");
    let impostor_addr = impostor.local_addr().expect("address");
    let serving = tokio::spawn(async move {
        while let Some(incoming) = impostor.accept().await {
            tokio::spawn(async move {
                let Ok(connecting) = incoming.accept() else {
                    return;
                };
                let Ok(conn) = connecting.await else { return };
                if let Ok(mut stream) = conn.open_uni().await {
                    let _ = stream.write_all(&announcement(2, 7)).await;
                    let _ = stream.finish();
                }
                conn.closed().await;
            });
        }
    });
    a.transport.connect_seed(impostor_addr);
    a.transport.set_peers(vec![(2, impostor_addr)]);
    expect_nothing(&mut a.events, "member").await;
    assert!(a.transport.connected().is_empty());
    serving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_stream_frame_is_refused_and_the_receiver_keeps_serving() {
    let ca = ClusterCa::generate().expect("ca");
    let mut a = start(member(&ca, 1), 1);
    // A member that ignores the frame limit: a raw client, honest about its
    // slot, that streams 2 MiB.
    let (_endpoint, conn) = raw_dial(&member(&ca, 2), a.addr, CLUSTER_SERVER_NAME, 2, 7).await;
    assert_eq!(announced_slot(&conn).await, 1);
    expect_connected(&mut a.events, 2).await;

    let mut huge = conn.open_uni().await.expect("open");
    // The sender may see the stream stopped (FRAME_TOO_LONG) or, when QUIC
    // acknowledged every byte before the receiver read past the limit, a
    // finished stream: what matters is the receiver's side, below.
    let _ = timeout(WAIT, async {
        let _ = huge.write_all(&vec![0xAB; 2 << 20]).await;
        let _ = huge.finish();
        let _ = huge.stopped().await;
    })
    .await;
    let start = std::time::Instant::now();
    while a.transport.stats(2).map_or(0, |s| s.frames_too_long) == 0 {
        assert!(
            start.elapsed() < WAIT,
            "the oversized frame was not refused"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(a.transport.stats(2).map(|s| s.frames_too_long), Some(1));

    let mut small = conn.open_uni().await.expect("open");
    small.write_all(b"after").await.expect("write");
    small.finish().expect("finish");
    assert_eq!(expect_frame(&mut a.events, 2, true).await, b"after");
    conn.send_datagram(b"datagram".to_vec().into())
        .expect("datagram");
    assert_eq!(expect_frame(&mut a.events, 2, false).await, b"datagram");
    let stats = a.transport.stats(2).expect("still connected");
    assert_eq!(stats.frames_too_long, 1);
    assert_eq!(a.transport.connected(), vec![2]);
    a.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_replaces_the_connections_it_left_behind() {
    let ca = ClusterCa::generate().expect("ca");
    let mut a = start(member(&ca, 1), 1);
    let b = member(&ca, 2);
    // B's first process: its connection would linger until the idle
    // timeout had it crashed.
    let (_old_endpoint, old) = raw_dial(&b, a.addr, &slot_server_name(1), 2, 100).await;
    assert_eq!(announced_slot(&old).await, 1);
    expect_connected(&mut a.events, 2).await;
    // A second connection of the same process is just another link.
    let (_same_endpoint, same) = raw_dial(&b, a.addr, &slot_server_name(1), 2, 100).await;
    assert_eq!(announced_slot(&same).await, 1);
    // B restarts: a new instance announces itself.
    let (_new_endpoint, new) = raw_dial(&b, a.addr, &slot_server_name(1), 2, 101).await;
    assert_eq!(announced_slot(&new).await, 1);
    expect_event(&mut a.events, "Disconnected { slot: 2 }", |event| {
        (*event == Incoming::Disconnected { slot: 2 }).then_some(())
    })
    .await;
    expect_connected(&mut a.events, 2).await;
    for conn in [&old, &same] {
        match timeout(WAIT, conn.closed()).await.expect("closed by A") {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(
                    close.error_code,
                    quinn::VarInt::from_u32(close_code::REPLACED)
                );
            }
            other => panic!("closed with {other}"),
        }
    }
    assert_eq!(a.transport.connected(), vec![2]);
    new.send_datagram(b"fresh".to_vec().into())
        .expect("datagram");
    assert_eq!(expect_frame(&mut a.events, 2, false).await, b"fresh");
    a.transport.shutdown().await;
}
