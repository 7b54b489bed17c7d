//! The gRPC API over mutual TLS: a client with a certificate from the
//! configured client CA is served; one without a certificate, one with a
//! certificate from another CA, and a plaintext client are refused.

mod grpc_support;

use drl::grpc::pb::rate_limiter_client::RateLimiterClient;
use drl::grpc::pb::CheckRequest;
use drl::net::{generate_dev_certs, local_cluster_specs};
use drl::node::GrpcTls;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use grpc_support::{cluster_dir, GrpcNode};

const RULES: &str = r#"
[[rules]]
name = "per-user"
match = { user = "*" }
limits = [ { algorithm = "sliding_window", limit = 5, window = "1h" } ]
"#;

fn check() -> CheckRequest {
    CheckRequest {
        descriptors: [("user".to_owned(), "alice".to_owned())].into(),
        cost: None,
        limit: None,
    }
}

/// A client over TLS that trusts `ca` and presents `identity`, if any.
async fn client(
    url: &str,
    ca: &[u8],
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<RateLimiterClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("node-0");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(RateLimiterClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_of_the_client_ca() {
    let dir = cluster_dir("tls", 2, RULES);
    let certs = dir.join("certs");
    // Clients get certificates from a CA of their own, not the cluster's.
    let clients = dir.join("client-certs");
    generate_dev_certs(&clients, &local_cluster_specs(1)).unwrap();
    let stranger = dir.join("stranger-certs");
    generate_dev_certs(&stranger, &local_cluster_specs(1)).unwrap();
    let tls = GrpcTls {
        cert: certs.join("node-0.pem"),
        key: certs.join("node-0-key.pem"),
        client_ca: Some(clients.join("ca.pem")),
    };
    let node = GrpcNode::start_with(&dir, 0, vec![], Some(tls)).await;
    node.wait_ready().await;
    let url = format!("https://{}", node.grpc);
    let server_ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let identity = |d: &std::path::Path| {
        Some((
            std::fs::read(d.join("node-0.pem")).unwrap(),
            std::fs::read(d.join("node-0-key.pem")).unwrap(),
        ))
    };

    let mut good = client(&url, &server_ca, identity(&clients)).await.unwrap();
    let r = good.check(check()).await.unwrap().into_inner();
    assert!(r.allowed);
    assert_eq!(r.remaining, Some(4));

    // No certificate, or one from another CA: the handshake fails, so the
    // call does (the connection may be refused at connect or at the call).
    for identity in [None, identity(&stranger)] {
        let refused = match client(&url, &server_ca, identity).await {
            Err(_) => true,
            Ok(mut c) => c.check(check()).await.is_err(),
        };
        assert!(refused, "a client outside the client CA was served");
    }
    // Plaintext HTTP/2 to a TLS port.
    let plain = Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(RateLimiterClient::new(channel)
            .check(check())
            .await
            .is_err());
    }
    // None of the refused calls counted.
    let r = good.check(check()).await.unwrap().into_inner();
    assert_eq!(r.remaining, Some(3));
    node.shutdown().await;
}
