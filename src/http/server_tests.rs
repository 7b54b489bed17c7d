//! The answer-gathering stream of a connection, on a real socket pair.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn pair(http2: bool) -> (Watched, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let watched = Watched::new(server, Instant::now(), Arc::new(AtomicU64::new(0)), http2);
    (watched, client)
}

/// What the client can read within `wait`.
async fn arrived(client: &mut TcpStream, wait: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(wait, client.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[tokio::test]
async fn http1_answers_wait_for_the_end_of_the_batch_and_go_in_one_piece() {
    let (mut server, mut client) = pair(false).await;
    for i in 0..3 {
        server
            .write_all(format!("HTTP/1.1 200 OK\r\nx: {i}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        server.flush().await.unwrap();
    }
    // Flushed, but the server has not looked for more requests yet.
    assert!(arrived(&mut client, Duration::from_millis(50))
        .await
        .is_empty());
    // It looks, finds none: the batch is over and every answer goes.
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(20), server.read(&mut buf))
            .await
            .is_err()
    );
    let got = arrived(&mut client, Duration::from_millis(200)).await;
    assert_eq!(
        String::from_utf8_lossy(&got)
            .matches("HTTP/1.1 200 OK")
            .count(),
        3
    );
}

#[tokio::test]
async fn answers_owed_when_the_connection_is_dropped_are_still_written() {
    let (mut server, mut client) = pair(false).await;
    server
        .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        .await
        .unwrap();
    server.flush().await.unwrap();
    drop(server);
    let got = arrived(&mut client, Duration::from_millis(500)).await;
    assert_eq!(got, b"HTTP/1.1 400 Bad Request\r\n\r\n");
}

#[tokio::test]
async fn many_owed_bytes_go_without_waiting_for_the_end_of_the_batch() {
    let (mut server, mut client) = pair(false).await;
    let answer = format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(1000));
    for _ in 0..(FLUSH_AT / answer.len() + 2) {
        server.write_all(answer.as_bytes()).await.unwrap();
    }
    assert!(arrived(&mut client, Duration::from_millis(100)).await.len() >= FLUSH_AT);
}

#[tokio::test]
async fn h2_frames_are_written_at_once_where_h2c_is_on() {
    let (mut server, mut client) = pair(true).await;
    // A SETTINGS frame: 3 bytes of length, its type (4), flags, stream 0.
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    server.write_all(&settings).await.unwrap();
    server.flush().await.unwrap();
    assert_eq!(
        arrived(&mut client, Duration::from_millis(200)).await,
        settings
    );
    // The same port's HTTP/1.1 connections gather their answers.
    let (mut server, mut client) = pair(true).await;
    server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    server.flush().await.unwrap();
    assert!(arrived(&mut client, Duration::from_millis(50))
        .await
        .is_empty());
}
