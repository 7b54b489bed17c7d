//! The gRPC listener: bind (before the node starts, so a taken port fails
//! before the node joins its cluster), serve Envoy's rate limit service,
//! the native API and health over the node's [`Service`], drain.
//! The composition root (`server`) starts it beside the other front-ends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

use super::envoy_service::EnvoyRateLimit;
use super::native::NativeRateLimiter;
use super::pb::rate_limiter_server::RateLimiterServer;
use super::state::GrpcState;
use crate::listen::AdmissionLimits;
use crate::node::GrpcTls;
use crate::service::Service;

/// The services whose health `grpc.health.v1` reports, besides `""` (the
/// whole server).
pub const SERVICES: [&str; 2] = [
    "envoy.service.ratelimit.v3.RateLimitService",
    "drl.v1.RateLimiter",
];

/// Most calls in flight on one HTTP/2 connection; a client that wants more
/// waits for a stream to close (or opens another connection).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// How often health follows the node's readiness.
const HEALTH_INTERVAL: Duration = Duration::from_millis(100);

/// Why the gRPC listener could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The gRPC port could not be bound.
    #[error("cannot listen for gRPC on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A file of the gRPC TLS configuration could not be read.
    #[error("gRPC TLS: cannot read {path}: {source}")]
    TlsRead {
        /// The file.
        path: std::path::PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },
    /// tonic refused the TLS configuration or stopped serving.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A bound, not yet serving, gRPC port.
pub struct GrpcListener {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<ServerTlsConfig>,
}

impl GrpcListener {
    /// Binds `addr` (port 0 picks a free port), serving plain HTTP/2 until
    /// [`with_tls`](Self::with_tls).
    pub async fn bind(addr: SocketAddr) -> Result<GrpcListener, GrpcError> {
        let err = |source| GrpcError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(GrpcListener {
            listener,
            addr,
            tls: None,
        })
    }

    /// Serves over TLS with `tls`'s certificate, and asks clients for a
    /// certificate signed by its client CA when it names one. The files are
    /// read now, so a missing one fails before the node starts.
    pub fn with_tls(mut self, tls: &GrpcTls) -> Result<GrpcListener, GrpcError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| GrpcError::TlsRead {
                path: path.to_owned(),
                source,
            })
        };
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        if let Some(ca) = &tls.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        self.tls = Some(config);
        Ok(self)
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the three services over `service` until `shutdown`
    /// resolves, then stops accepting and waits for in-flight calls.
    /// Decision calls are shed under `admission` (`UNAVAILABLE`); health
    /// is always answered.
    pub async fn serve(
        self,
        service: Service,
        admission: AdmissionLimits,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GrpcError> {
        let state = GrpcState::with_admission(service, admission);
        // The lag of the runtime that serves the calls: this one.
        let probe = state.lag().map(|lag| tokio::spawn(lag.clone().probe()));
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let api = state.service().node().clone();
        let (stop_health, mut health_stopped) = tokio::sync::watch::channel(false);
        let follow = tokio::spawn(async move {
            let mut last = None;
            loop {
                let ready = api.is_ready();
                if last != Some(ready) {
                    let status = if ready {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    for name in std::iter::once("").chain(SERVICES) {
                        reporter.set_service_status(name, status).await;
                    }
                    last = Some(ready);
                }
                tokio::select! {
                    () = tokio::time::sleep(HEALTH_INTERVAL) => {}
                    _ = health_stopped.changed() => return,
                }
            }
        });
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        let result = builder
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .add_service(health)
            .add_service(RateLimitServiceServer::new(EnvoyRateLimit::new(
                state.clone(),
            )))
            .add_service(RateLimiterServer::new(NativeRateLimiter::new(state)))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        let _ = stop_health.send(true);
        let _ = follow.await;
        if let Some(probe) = probe {
            probe.abort();
        }
        Ok(result?)
    }
}
