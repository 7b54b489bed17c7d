//! A web service protected by the rate-limit layer, deciding through a
//! local cluster.
//!
//! ```sh
//! cargo run --release -- cluster --nodes 3        # in another terminal
//! cargo run -p drl-client --example web_service
//! curl -si -H 'x-user-id: alice' http://127.0.0.1:3000/v1/search
//! curl -s http://127.0.0.1:3000/metrics | grep drl_client
//! ```
//!
//! `DRL_NODES` lists the nodes (default: the three of `drl cluster`),
//! `LISTEN` the service's address (default 127.0.0.1:3000).

use std::sync::Arc;

use axum::{routing::get, Router};
use drl_client::{Client, DegradedMode, Fallback, RateLimitLayer};
use prometheus_client::registry::Registry;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("DRL_NODES")
        .unwrap_or_else(|_| "127.0.0.1:8400,127.0.0.1:8401,127.0.0.1:8402".into());
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());

    // The nearest healthy node decides; if none answers, hot users spend
    // the budget leased to this process and everyone else is let through.
    let client = Client::builder()
        .nodes(nodes.split(','))
        .degraded(DegradedMode::Local {
            otherwise: Fallback::Allow,
        })
        .build()
        .await?;

    let mut registry = Registry::default();
    client.metrics().register(&mut registry);
    let registry = Arc::new(registry);

    let app = Router::new()
        .route("/v1/search", get(|| async { "results\n" }))
        .layer(RateLimitLayer::new(client.clone(), |head| {
            let user = head.headers.get("x-user-id")?.to_str().ok()?.to_owned();
            Some(vec![
                ("user".into(), user),
                ("endpoint".into(), head.uri.path().to_owned()),
            ])
        }))
        // Outside the layer: never limited.
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => text,
                        Err(e) => format!("# encoding failed: {e}\n"),
                    }
                }
            }),
        );

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
