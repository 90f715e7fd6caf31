//! Where a request came from: the connection's peer, and the proxies trusted to say who *their*
//! client was (`--trusted-proxies`). A client that is not a trusted proxy cannot tell a
//! function where the request came from: its `X-Forwarded-*`, `Forwarded` and `X-Real-Ip` are
//! dropped, and `X-Forwarded-For` is set from the peer address.

use std::net::IpAddr;
use std::str::FromStr;

/// One trusted proxy: an address or a CIDR block (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix: u8,
}

/// An invalid `--trusted-proxies` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8, 127.0.0.1, fd00::/8)")]
pub struct InvalidIpBlock(String);

impl FromStr for IpBlock {
    type Err = InvalidIpBlock;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidIpBlock(s.to_owned());
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| invalid())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(invalid)?,
        };
        Ok(Self { network, prefix })
    }
}

impl IpBlock {
    /// Is `ip` in this block? (An IPv4-mapped IPv6 peer is compared as IPv4.)
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses one `--trusted-proxies` entry (clap value parser).
pub fn parse_ip_block(s: &str) -> Result<IpBlock, String> {
    s.parse().map_err(|e: InvalidIpBlock| e.to_string())
}

/// The proxies whose forwarding headers are believed. Empty (the default): nobody's.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub Vec<IpBlock>);

impl TrustedProxies {
    /// Is `peer` a trusted proxy?
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|block| block.contains(peer))
    }
}

/// The `X-Forwarded-For` the function gets for a request from `peer` whose own
/// `X-Forwarded-For` values are `client_values`: the peer alone, or, from a trusted proxy, the
/// proxy's chain followed by the proxy. `None` without a peer address (not served over TCP).
pub fn forwarded_for<'a>(
    peer: Option<IpAddr>,
    trusted: bool,
    client_values: impl Iterator<Item = &'a str>,
) -> Option<String> {
    let peer = peer?;
    let mut chain: Vec<&str> = if trusted {
        client_values
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect()
    } else {
        Vec::new()
    };
    let peer = peer.to_string();
    chain.push(&peer);
    Some(chain.join(", "))
}

/// The client a request came from, as far as it can be believed: the peer, or, when the peer
/// is a trusted proxy, the nearest address of its `X-Forwarded-For` chain (read from the right)
/// that is not itself a trusted proxy. An entry that is not an address ends the walk at the hop
/// before it (never a value the client could have invented). `None` without a peer address.
pub fn client_address<'a>(
    peer: Option<IpAddr>,
    trusted: &TrustedProxies,
    client_values: impl DoubleEndedIterator<Item = &'a str>,
) -> Option<IpAddr> {
    let mut client = peer?;
    if !trusted.trusts(client) {
        return Some(client);
    }
    for entry in client_values
        .rev()
        .flat_map(|v| v.rsplit(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        let Ok(hop) = entry.parse::<IpAddr>() else {
            break;
        };
        client = hop;
        if !trusted.trusts(hop) {
            break;
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_parse_and_match() {
        let block: IpBlock = "10.0.0.0/8".parse().unwrap();
        assert!(block.contains("10.1.2.3".parse().unwrap()));
        assert!(!block.contains("11.0.0.1".parse().unwrap()));
        assert!(block.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: IpBlock = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: IpBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: IpBlock = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<IpBlock>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forwarded_for_is_the_peer_unless_it_is_trusted() {
        let peer = Some("10.0.0.5".parse().unwrap());
        assert_eq!(
            forwarded_for(peer, false, ["6.6.6.6"].into_iter()).as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(
            forwarded_for(peer, true, ["1.2.3.4, 5.6.7.8", "9.9.9.9"].into_iter()).as_deref(),
            Some("1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.5")
        );
        assert_eq!(forwarded_for(None, false, std::iter::empty()), None);
    }

    #[test]
    fn client_address_believes_only_trusted_proxies() {
        let trusted = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let untrusted = Some(ip("192.0.2.7"));
        assert_eq!(
            client_address(untrusted, &trusted, ["6.6.6.6"].into_iter()),
            untrusted
        );
        let proxy = Some(ip("10.0.0.5"));
        assert_eq!(
            client_address(
                proxy,
                &trusted,
                ["6.6.6.6, 198.51.100.4", "10.0.0.9"].into_iter()
            ),
            Some(ip("198.51.100.4")),
            "the nearest hop that is not a trusted proxy"
        );
        assert_eq!(
            client_address(proxy, &trusted, ["garbage, 10.0.0.9"].into_iter()),
            Some(ip("10.0.0.9"))
        );
        assert_eq!(client_address(proxy, &trusted, std::iter::empty()), proxy);
        assert_eq!(client_address(None, &trusted, std::iter::empty()), None);
    }
}
