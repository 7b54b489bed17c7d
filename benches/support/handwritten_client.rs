//! The hand-written HTTP/1.1 client the product used before hyper's, kept
//! here as the peer of `benches/replaced.rs`.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest answer body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid node URL {0:?}: use http://host:port")]
    Url(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed HTTP answer: {0}")]
    Malformed(String),
    #[error("no answer within {0:?}")]
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
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
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
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One keep-alive connection to one server.
pub struct Connection {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
    out: Vec<u8>,
    timeout: Duration,
}

impl Connection {
    /// Connects to `url` (`http://host:port` or `host:port`).
    pub async fn open(url: &str) -> Result<Connection, ClientError> {
        let host = authority(url)?;
        let stream =
            TcpStream::connect(host.as_str())
                .await
                .map_err(|source| ClientError::Connect {
                    addr: host.clone(),
                    source,
                })?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            host,
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(1024),
            timeout: Duration::from_secs(30),
        })
    }

    /// Connects to a socket address.
    pub async fn open_addr(addr: SocketAddr) -> Result<Connection, ClientError> {
        Connection::open(&addr.to_string()).await
    }

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
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.exchange(method, path, headers, body))
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    pub async fn get(&mut self, path: &str) -> Result<Answer, ClientError> {
        self.request("GET", path, &[], b"").await
    }

    pub async fn post_json(&mut self, path: &str, body: &str) -> Result<Answer, ClientError> {
        self.request(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, ClientError> {
        self.out.clear();
        write_head(&mut self.out, method, path, &self.host, headers, body.len());
        self.out.extend_from_slice(body);
        if let Err(e) = self.stream.write_all(&self.out).await {
            // A server may answer before reading the whole request (an early
            // 413 for a body it will not take) and close: its answer is
            // still there to read.
            if !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                return Err(e.into());
            }
        }
        self.read_answer(method == "HEAD").await
    }

    /// Sends bytes that are already a complete request (the load generator
    /// builds them once) and reads the answer's status, discarding the body.
    pub async fn send_raw(&mut self, request: &[u8]) -> Result<u16, ClientError> {
        self.stream.write_all(request).await?;
        let (status, _, len) = self.read_head().await?;
        self.skip_body(len).await?;
        Ok(status)
    }

    async fn read_answer(&mut self, head_only: bool) -> Result<Answer, ClientError> {
        let (status, headers, len) = self.read_head().await?;
        let body = if head_only || status == 204 || status == 304 {
            Vec::new()
        } else {
            self.read_body(len).await?
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// Reads up to the end of the head; leaves any body bytes in `buf`.
    async fn read_head(
        &mut self,
    ) -> Result<(u16, Vec<(String, String)>, Option<usize>), ClientError> {
        let end = loop {
            if let Some(i) = find_head_end(&self.buf) {
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ClientError::Malformed("head too long".into()));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        };
        let head = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| ClientError::Malformed("head is not UTF-8".into()))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|_| status_line.starts_with("HTTP/1."))
            .ok_or_else(|| ClientError::Malformed(format!("status line {status_line:?}")))?;
        let mut headers = Vec::new();
        let mut len = None;
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| ClientError::Malformed(format!("header line {line:?}")))?;
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().to_owned();
            if name == "content-length" {
                len = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| ClientError::Malformed("content-length".into()))?,
                );
            }
            if name == "transfer-encoding" && !value.eq_ignore_ascii_case("identity") {
                return Err(ClientError::Malformed(format!(
                    "transfer-encoding {value} is not supported"
                )));
            }
            headers.push((name, value));
        }
        self.buf.drain(..end + 4);
        Ok((status, headers, len))
    }

    async fn read_body(&mut self, len: Option<usize>) -> Result<Vec<u8>, ClientError> {
        match len {
            Some(n) if n > MAX_BODY => Err(ClientError::Malformed(format!("body of {n} bytes"))),
            Some(n) => {
                while self.buf.len() < n {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(ClientError::Malformed("body cut short".into()));
                    }
                }
                Ok(self.buf.drain(..n).collect())
            }
            None => {
                while self.stream.read_buf(&mut self.buf).await? > 0 {
                    if self.buf.len() > MAX_BODY {
                        return Err(ClientError::Malformed("body too long".into()));
                    }
                }
                Ok(std::mem::take(&mut self.buf))
            }
        }
    }

    async fn skip_body(&mut self, len: Option<usize>) -> Result<(), ClientError> {
        let n = len.ok_or_else(|| ClientError::Malformed("no content-length".into()))?;
        while self.buf.len() < n {
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ClientError::Malformed("body cut short".into()));
            }
        }
        self.buf.drain(..n);
        Ok(())
    }

    /// The `host:port` this connection talks to.
    pub fn host(&self) -> &str {
        &self.host
    }
}

/// Writes a request head with a `Content-Length`.
pub fn write_head(
    out: &mut Vec<u8>,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body_len: usize,
) {
    use std::io::Write;
    let _ = write!(out, "{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
    for (name, value) in headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    let _ = write!(out, "content-length: {body_len}\r\n\r\n");
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}
