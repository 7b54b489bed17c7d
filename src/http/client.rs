//! The HTTP/1.1 client of `drl check`, `drl rules`, `drl cluster`, the load
//! generator and the tests: one keep-alive connection to one server, on
//! hyper's client (`hyper::client::conn::http1`).
//!
//! Plain `http://` only (the nodes' HTTP API has no TLS). hyper frames the
//! answers (`Content-Length`, chunked, or to the end of the connection) and
//! this module caps what it keeps of them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Largest answer body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
/// Why a request of the HTTP client got no answer.
pub enum ClientError {
    #[error("invalid node URL {0:?}: use http://host:port")]
    /// Not `http://host:port` (or a bare `host:port`).
    Url(String),
    #[error("cannot connect to {addr}: {source}")]
    /// The TCP connection could not be made.
    Connect {
        /// The `host:port` dialled.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("{0}")]
    /// An I/O error on the open connection.
    Io(#[from] std::io::Error),
    /// The request could not be built (a method, path or header that HTTP
    /// does not allow).
    #[error("invalid request: {0}")]
    Request(String),
    /// The exchange failed: the server closed the connection, or sent
    /// something that is not HTTP/1.1.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("malformed HTTP answer: {0}")]
    /// The answer's body could not be read in full, or exceeds 16 MiB.
    Malformed(String),
    #[error("no answer within {0:?}")]
    /// No answer within the connection's timeout.
    Timeout(Duration),
}

/// `http://host:port[/...]` → `host:port`. A bare `host:port` works too.
pub fn authority(url: &str) -> Result<String, ClientError> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.contains("://") {
        return Err(ClientError::Url(url.to_owned()));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || !authority.contains(':') {
        return Err(ClientError::Url(url.to_owned()));
    }
    Ok(authority.to_owned())
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body, whole.
    pub body: Vec<u8>,
}

impl Answer {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The body as text, invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One keep-alive connection to one server. Dropping it closes the
/// connection.
pub struct Connection {
    send: SendRequest<Full<Bytes>>,
    /// Drives the connection's I/O; aborted on drop.
    driver: JoinHandle<()>,
    host: String,
    timeout: Duration,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Connection {
    /// Connects to `url` (`http://host:port` or `host:port`).
    pub async fn open(url: &str) -> Result<Connection, ClientError> {
        Connection::open_from(url, None).await
    }

    /// Connects to `url` from the local address `source` (any port), or
    /// from any address when `None`.
    pub async fn open_from(url: &str, source: Option<IpAddr>) -> Result<Connection, ClientError> {
        let host = authority(url)?;
        let stream = connect_from(&host, source)
            .await
            .map_err(|source| ClientError::Connect {
                addr: host.clone(),
                source,
            })?;
        let (send, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            // Ends when the server closes or the connection is dropped; an
            // error surfaces on the next request.
            let _ = connection.await;
        });
        Ok(Connection {
            send,
            driver,
            host,
            timeout: Duration::from_secs(30),
        })
    }

    /// Connects to a socket address.
    pub async fn open_addr(addr: SocketAddr) -> Result<Connection, ClientError> {
        Connection::open(&addr.to_string()).await
    }

    /// How long [`request`](Self::request) waits for an answer (default 30 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends one request and reads its answer.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, ClientError> {
        let mut request = Request::builder()
            .method(
                Method::from_bytes(method.as_bytes())
                    .map_err(|e| ClientError::Request(e.to_string()))?,
            )
            .uri(path)
            .header("host", self.host.as_str());
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| ClientError::Request(format!("header {name:?}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| ClientError::Request(format!("header {name}: {e}")))?;
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.exchange(request))
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    /// `GET path` with no body.
    pub async fn get(&mut self, path: &str) -> Result<Answer, ClientError> {
        self.request("GET", path, &[], b"").await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&mut self, path: &str, body: &str) -> Result<Answer, ClientError> {
        self.request(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
    }

    /// Sends a request built by the caller (the load generator) and returns
    /// the answer's status, with its body when the status is neither 200
    /// nor 429 (a refusal says why in it; other bodies are discarded), and
    /// its `Retry-After` in seconds when it has one.
    pub async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<(u16, Option<Vec<u8>>, Option<u64>), ClientError> {
        self.send.ready().await?;
        let answer = self.send.send_request(request).await?;
        let status = answer.status().as_u16();
        let retry_after = answer
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let mut body = answer.into_body();
        if status == 200 || status == 429 {
            while let Some(frame) = body.frame().await {
                frame?;
            }
            return Ok((status, None, retry_after));
        }
        let bytes = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| ClientError::Malformed(format!("body: {e}")))?
            .to_bytes()
            .to_vec();
        Ok((status, Some(bytes), retry_after))
    }

    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> Result<Answer, ClientError> {
        self.send.ready().await?;
        let answer = self.send.send_request(request).await?;
        let status = answer.status().as_u16();
        let headers = answer
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = Limited::new(answer.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| ClientError::Malformed(format!("body: {e}")))?
            .to_bytes()
            .to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// The `host:port` this connection talks to.
    pub fn host(&self) -> &str {
        &self.host
    }
}

/// A TCP connection to `host` (`host:port`), from the local address
/// `source` when given, with `TCP_NODELAY`.
pub async fn connect_from(host: &str, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        let stream = TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        return Ok(stream);
    };
    let mut last = None;
    for addr in tokio::net::lookup_host(host).await? {
        if addr.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{host} has no address of the family of {source}"),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_from_urls() {
        assert_eq!(
            authority("http://127.0.0.1:8400").unwrap(),
            "127.0.0.1:8400"
        );
        assert_eq!(authority("http://h:1/x/y").unwrap(), "h:1");
        assert_eq!(authority("h:1").unwrap(), "h:1");
        assert!(authority("https://h:1").is_err());
        assert!(authority("http://h").is_err());
    }
}
