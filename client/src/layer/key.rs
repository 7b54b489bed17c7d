//! Where a descriptor field's value comes from: [`Key`] and the address
//! ranges a forwarded-for header is trusted from ([`Cidr`]).

use super::*;

/// A custom key: a request head's value for a field, or `None`.
pub type KeyFn = dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync;

/// Where a descriptor field's value comes from ([`LayerBuilder::key`]).
#[derive(Clone)]
pub enum Key {
    /// The peer's IP address: a `SocketAddr` in the request's extensions
    /// (with feature `axum`, also axum's `ConnectInfo<SocketAddr>`: serve
    /// with `into_make_service_with_connect_info::<SocketAddr>()`).
    PeerIp,
    /// The client's address from `X-Forwarded-For`, trusted only when the
    /// peer is one of the listed proxies: the rightmost address that is
    /// not a trusted proxy. From any other peer the header is ignored and
    /// the peer's IP is the key (a client cannot forge it).
    ForwardedFor(Arc<[Cidr]>),
    /// A header's value (text).
    Header(http::HeaderName),
    /// The `n`th segment of the path (0 is the first after `/`).
    PathSegment(usize),
    /// The whole path.
    Path,
    /// A custom closure; `None` means no value.
    Custom(Arc<KeyFn>),
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::PeerIp => f.write_str("PeerIp"),
            Key::ForwardedFor(t) => write!(f, "ForwardedFor({} trusted)", t.len()),
            Key::Header(h) => write!(f, "Header({h})"),
            Key::PathSegment(n) => write!(f, "PathSegment({n})"),
            Key::Path => f.write_str("Path"),
            Key::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// An address range, `10.0.0.0/8` or `::1/128` (a bare address is one
/// address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or `addr`.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (a, p) = text.split_once('/').unwrap_or((text, ""));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{text:?}: prefix length 0 to {max}"))?
        };
        Ok(Cidr { addr, prefix })
    }

    /// True when `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u8) {
            match ip {
                IpAddr::V4(v) => (u128::from(u32::from(v)) << 96, 32),
                IpAddr::V6(v) => match v.to_ipv4_mapped() {
                    Some(v4) => (u128::from(u32::from(v4)) << 96, 32),
                    None => (u128::from(v), 128),
                },
            }
        };
        let ((a, la), (b, lb)) = (bits(self.addr), bits(ip));
        if la != lb {
            return false;
        }
        let p = u32::from(self.prefix);
        let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
        a & mask == b & mask
    }
}

impl Key {
    /// A header's value.
    pub fn header(name: &'static str) -> Key {
        Key::Header(http::HeaderName::from_static(name))
    }

    /// The client's address from `X-Forwarded-For` when the peer is one of
    /// `trusted` (addresses or ranges); errors name a bad entry.
    pub fn forwarded_for<I, S>(trusted: I) -> Result<Key, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = trusted
            .into_iter()
            .map(|t| Cidr::parse(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Key::ForwardedFor(list.into()))
    }

    /// A custom closure.
    pub fn custom(
        f: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Key {
        Key::Custom(Arc::new(f))
    }

    pub(super) fn value(&self, head: &http::request::Parts) -> Result<String, &'static str> {
        match self {
            Key::PeerIp => peer_ip(head)
                .map(|ip| ip.to_string())
                .ok_or("no peer address in the request's extensions"),
            Key::ForwardedFor(trusted) => {
                let peer = peer_ip(head).ok_or("no peer address in the request's extensions")?;
                if !trusted.iter().any(|c| c.contains(peer)) {
                    return Ok(peer.to_string());
                }
                let hops: Vec<IpAddr> = head
                    .headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .filter_map(|a| a.trim().parse().ok())
                    .collect();
                let client = hops
                    .iter()
                    .rev()
                    .find(|ip| !trusted.iter().any(|c| c.contains(**ip)))
                    .or(hops.first())
                    .copied()
                    .unwrap_or(peer);
                Ok(client.to_string())
            }
            Key::Header(name) => head
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or("header absent, empty or not text"),
            Key::PathSegment(n) => head
                .uri
                .path()
                .split('/')
                .filter(|s| !s.is_empty())
                .nth(*n)
                .map(str::to_owned)
                .ok_or("the path has no such segment"),
            Key::Path => Ok(head.uri.path().to_owned()),
            Key::Custom(f) => f(head).ok_or("the custom key gave no value"),
        }
    }
}

fn peer_ip(head: &http::request::Parts) -> Option<IpAddr> {
    if let Some(a) = head.extensions.get::<SocketAddr>() {
        return Some(a.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(a) = head
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(a.0.ip());
    }
    None
}
