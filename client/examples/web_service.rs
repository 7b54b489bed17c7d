//! An axum service protected by the rate-limit layer: the seven lines of
//! `serve` are all the user code (the rest reads the environment).
//!
//! ```sh
//! cargo run --release -- cluster --nodes 3        # in another terminal
//! cargo run -p drl-client --example web_service
//! curl -si -H 'x-user-id: alice' http://127.0.0.1:3000/v1/search
//! ```
//!
//! `DRL_NODES` lists the nodes' HTTP addresses (default: the three of
//! `drl cluster`), `LISTEN` the service's address (default 127.0.0.1:3000).
//! `tests/sdk_examples.rs` runs `serve` against a real `drl cluster`.

use axum::{routing::get, Router};
use drl_client::{Client, Key, RateLimitLayer};
use tokio::net::TcpListener;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Serves `/v1/search` on `listener`, limited per user and endpoint by
/// the cluster at `nodes`.
pub async fn serve(nodes: Vec<String>, listener: TcpListener) -> Result<(), Error> {
    let client = Client::builder().nodes(nodes).build().await?;
    let keys = RateLimitLayer::builder(client).key("endpoint", Key::Path);
    let limit = keys.key("user", Key::header("x-user-id")).build();
    let search = get(|| async { "results\n" });
    let app = Router::new().route("/v1/search", search).layer(limit);
    axum::serve(listener, app).await?;
    Ok(())
}

#[tokio::main]
#[allow(dead_code)]
async fn main() -> Result<(), Error> {
    let nodes = std::env::var("DRL_NODES")
        .unwrap_or_else(|_| "127.0.0.1:8400,127.0.0.1:8401,127.0.0.1:8402".into());
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    serve(nodes.split(',').map(str::to_owned).collect(), listener).await
}
