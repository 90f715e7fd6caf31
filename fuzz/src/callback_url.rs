//! Callback URLs, a client's input: `parse_callback_url` at the gateway and again at the
//! worker, then the egress policy (`EgressPolicy::check_url` on the URL, `check_resolved` and
//! `check_endpoint` on each address it reaches).
//!
//! The invariant: nothing the policy accepts reaches an address refused by default (link-local,
//! metadata, unspecified, multicast, broadcast), in any notation, directly or inside an IPv6
//! address, unless a narrow allow entry opts that range back in; and nothing in a deny block is
//! accepted. The refused ranges are written out here a second time, independently of
//! `queue_core::egress`, as the oracle. Also: the URL the worker parses again from its text
//! gets the same verdict, the connect-time check of an address literal agrees with the static
//! one, and under the default policy a literal is refused exactly when the oracle refuses it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Result, Unstructured};
use ipnet::IpNet;
use queue_core::egress::{EgressPolicy, Rule, parse_rule};
use queue_core::message::parse_callback_url;

use crate::generate::{list, text};
use crate::{must, some};

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    check(&raw, &EgressPolicy::default(), &Lists::default(), true);

    let mut u = Unstructured::new(data);
    let Ok((url, deny, allow)) = url_and_rules(&mut u) else {
        return;
    };
    let lists = Lists::new(&deny, &allow);
    let policy = EgressPolicy::new(&deny, &allow);
    check(&url, &policy, &lists, deny.is_empty() && allow.is_empty());
    check(&url, &EgressPolicy::default(), &Lists::default(), true);
    if let Ok((name, ip, port)) = resolved(&mut u) {
        if policy.check_resolved(&name, ip).is_ok() {
            assert!(lists.reachable(ip), "{name} at {ip} passed");
        }
        if policy.check_endpoint(&name, port, ip).is_ok() {
            assert!(lists.reachable(ip), "{name}:{port} at {ip} passed");
        }
    }
}

fn check(raw: &str, policy: &EgressPolicy, lists: &Lists, default_policy: bool) {
    let Ok(url) = parse_callback_url(raw) else {
        return;
    };
    assert!(matches!(url.scheme(), "http" | "https"));
    let host = some(url.host_str(), "a callback URL has a host");
    assert!(!host.is_empty());
    // The gateway stores the text; the worker parses it again.
    let again = must(
        parse_callback_url(url.as_str()),
        "a parsed URL parses again",
    );
    assert_eq!(again.host(), url.host());
    let verdict = policy.check_url(&url);
    assert_eq!(policy.check_url(&again), verdict, "{url}");

    let literal = match url.host() {
        Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
        _ => None,
    };
    let port = some(url.port_or_known_default(), "http and https have ports");
    if let Some(ip) = literal {
        assert_eq!(policy.check_endpoint(host, port, ip), verdict, "{url}");
        if default_policy {
            assert_eq!(verdict.is_ok(), lists.reachable(ip), "{url}: {verdict:?}");
        }
    }
    if verdict.is_err() {
        return;
    }
    match literal {
        Some(ip) => assert!(lists.reachable(ip), "{url} passed"),
        None => {
            // A name that reads as an address once its trailing dots are trimmed, to std (what
            // a resolver call tries first) or to the URL parser, is never a refused one.
            let bare = host.trim_end_matches('.');
            let as_address = bare
                .parse::<IpAddr>()
                .ok()
                .or(match url::Host::parse(bare) {
                    Ok(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
                    Ok(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
                    _ => None,
                });
            if let Some(ip) = as_address {
                assert!(lists.reachable(ip), "{url} passed as a name");
            }
        }
    }
}

/// The refused-by-default ranges, written out independently of `queue_core::egress`.
fn default_ranges() -> [IpNet; 9] {
    let net = |s: &str| must(s.parse::<IpNet>(), "a built-in range");
    [
        net("0.0.0.0/8"),
        net("169.254.0.0/16"),
        net("224.0.0.0/4"),
        net("255.255.255.255/32"),
        net("100.100.100.200/32"),
        net("::/128"),
        net("fe80::/10"),
        net("ff00::/8"),
        net("fd00:ec2::254/128"),
    ]
}

/// The IPv4 address an IPv6 one reaches: mapped, compatible (not `::`, `::1`), NAT64.
fn inner_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    let o = v6.octets();
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let mapped = o[..10] == [0; 10] && o[10..12] == [0xff, 0xff];
    let compatible = o[..12] == [0; 12] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST;
    let nat64 = o[..12] == [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0];
    (mapped || compatible || nat64).then_some(low)
}

/// What the lists say independently of the policy's code: deny blocks, and the allow blocks
/// that opt a refused range back in (those inside one).
#[derive(Debug, Default)]
struct Lists {
    deny: Vec<IpNet>,
    opt_in: Vec<IpNet>,
}

impl Lists {
    fn new(deny: &[Rule], allow: &[Rule]) -> Self {
        let nets = |rules: &[Rule]| -> Vec<IpNet> {
            rules
                .iter()
                .filter_map(|r| match r {
                    Rule::Net(n) => Some(*n),
                    _ => None,
                })
                .collect()
        };
        let ranges = default_ranges();
        Self {
            deny: nets(deny),
            opt_in: nets(allow)
                .into_iter()
                .filter(|n| ranges.iter().any(|r| r.contains(n)))
                .collect(),
        }
    }

    /// May a connection reach `ip`, as far as the refused ranges and the deny blocks go?
    fn reachable(&self, ip: IpAddr) -> bool {
        let ranges = default_ranges();
        std::iter::once(ip)
            .chain(inner_v4(ip).map(IpAddr::V4))
            .all(|form| {
                let refused = ranges.iter().any(|r| r.contains(&form))
                    && !self.opt_in.iter().any(|n| n.contains(&form));
                let denied = self.deny.iter().any(|n| n.contains(&form));
                !refused && !denied
            })
    }
}

const URL_PIECES: &[&str] = &[
    "http://",
    "https://",
    "HTTP://",
    "http:/\\",
    "ftp://",
    "file:///",
    "//",
    "@",
    "user:pw@",
    "169.254.169.254",
    "169",
    "254",
    "0x",
    "a9",
    "fe",
    "0",
    "00",
    "1",
    "7",
    "8",
    "9",
    ".",
    "。",
    "[",
    "]",
    "::",
    "ffff:",
    "64:ff9b::",
    "fe80::1",
    "fd00:ec2::254",
    "::1",
    "%",
    "%31",
    "%2e",
    ":",
    "8080",
    "/",
    "\\",
    "?",
    "#",
    "localhost",
    "example.com",
    "xn--",
    "\u{ff11}",
    " ",
];
const RULE_PIECES: &[&str] = &[
    "10.0.0.0/8",
    "169.254.10.0/24",
    "169.254.0.0/16",
    "0.0.0.0/0",
    "::/0",
    "fe80::/64",
    "224.0.0.1",
    "127.0.0.1",
    "::ffff:169.254.169.254",
    "*.",
    "example.com",
    "localhost",
    ":80",
    ":1-65535",
    "/",
    "1",
    ".",
    "[",
    "]",
    "::",
    " ",
];

type Generated = (String, Vec<Rule>, Vec<Rule>);

fn url_and_rules(u: &mut Unstructured<'_>) -> Result<Generated> {
    let url = text(u, URL_PIECES, 16)?;
    let rules = |u: &mut Unstructured<'_>| -> Result<Vec<Rule>> {
        Ok(list(u, 3, |u| text(u, RULE_PIECES, 3))?
            .iter()
            .filter_map(|s| {
                let rule = parse_rule(s).ok()?;
                if let Rule::Net(n) = rule {
                    assert_eq!(n, n.trunc(), "{s:?} parsed to an untruncated block");
                }
                Some(rule)
            })
            .collect())
    };
    let deny = rules(u)?;
    let allow = rules(u)?;
    Ok((url, deny, allow))
}

fn resolved(u: &mut Unstructured<'_>) -> Result<(String, IpAddr, u16)> {
    let name = text(u, URL_PIECES, 4)?;
    let ip = if u.arbitrary()? {
        IpAddr::V4(Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?))
    } else {
        let mut o = u.arbitrary::<[u8; 16]>()?;
        // Reach the embedding prefixes often.
        match u.int_in_range(0..=3)? {
            0 => o[..12].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]),
            1 => o[..12].copy_from_slice(&[0; 12]),
            2 => o[..12].copy_from_slice(&[0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]),
            _ => {}
        }
        IpAddr::V6(Ipv6Addr::from(o))
    };
    Ok((name, ip, u.arbitrary()?))
}

/// URLs in the notations the policy must see through, and plain allowed ones.
pub fn seeds() -> Vec<Vec<u8>> {
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://0xa9fea9fe/",
        "http://0251.0376.0251.0376/",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://user:pass@169.254.169.254:8080/",
        "http://%31%36%39.254.169.254/",
        "http://[fe80::1]/",
        "http://[fd00:ec2::254]/",
        "http://0/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        "https://hooks.example.com/cb?x=1",
        "http://127.0.0.1:8082/cb",
        "http://localhost./",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
