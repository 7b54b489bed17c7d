//! [`Wire`]: the transport a [`crate::ClientBuilder`] picks, HTTP or gRPC,
//! as one type, so that `Client` names a client of either protocol.

use std::net::SocketAddr;
use std::time::Duration;

#[cfg(feature = "grpc")]
use crate::grpc::GrpcTransport;
use crate::transport::{
    CheckAnswer, CheckRequest, HttpTransport, RefundAnswer, Transport, TransportError,
};

/// The transport of a client built by [`crate::ClientBuilder::build`].
// One per client: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Wire {
    /// The HTTP API.
    Http(HttpTransport),
    /// The native gRPC API (feature `grpc`).
    #[cfg(feature = "grpc")]
    Grpc(GrpcTransport),
}

impl Transport for Wire {
    async fn check_batch(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> Vec<Result<CheckAnswer, TransportError>> {
        match self {
            Wire::Http(t) => t.check_batch(node, batch, timeout).await,
            #[cfg(feature = "grpc")]
            Wire::Grpc(t) => t.check_batch(node, batch, timeout).await,
        }
    }

    async fn check_atomic(
        &self,
        node: SocketAddr,
        batch: Vec<CheckRequest>,
        timeout: Duration,
    ) -> Result<Vec<CheckAnswer>, TransportError> {
        match self {
            Wire::Http(t) => t.check_atomic(node, batch, timeout).await,
            #[cfg(feature = "grpc")]
            Wire::Grpc(t) => t.check_atomic(node, batch, timeout).await,
        }
    }

    async fn refund(
        &self,
        node: SocketAddr,
        receipt: &str,
        timeout: Duration,
    ) -> Result<RefundAnswer, TransportError> {
        match self {
            Wire::Http(t) => t.refund(node, receipt, timeout).await,
            #[cfg(feature = "grpc")]
            Wire::Grpc(t) => t.refund(node, receipt, timeout).await,
        }
    }

    async fn probe(&self, node: SocketAddr, timeout: Duration) -> Result<(), TransportError> {
        match self {
            Wire::Http(t) => t.probe(node, timeout).await,
            #[cfg(feature = "grpc")]
            Wire::Grpc(t) => t.probe(node, timeout).await,
        }
    }
}
