//! Where the system may send a request: the callback URL policy (SSRF guard), and, with its own
//! settings, the function URL in direct mode. One pure type, [`EgressPolicy`], used by the
//! gateway at enqueue (the URL as written) and by the worker at delivery (the URL again, then
//! every address DNS returns, checked at connect time, so a name cannot resolve to one address
//! when checked and another when connected: DNS rebinding).
//!
//! Refused by default, whatever the lists say: link-local addresses (`169.254.0.0/16`,
//! `fe80::/10`; cloud metadata services live at `169.254.169.254`), the IPv6 metadata address
//! `fd00:ec2::254`, Alibaba Cloud's `100.100.100.200`, unspecified (`0.0.0.0/8`, `::`),
//! multicast (`224.0.0.0/4`, `ff00::/8`) and broadcast (`255.255.255.255`). An allow entry that
//! lies *inside* one of these ranges (`169.254.10.0/24`) opts that range back in; a wider one
//! (`0.0.0.0/0`) does not. Loopback and private ranges are allowed unless denied: on premises,
//! that is where receivers live.
//!
//! Operator lists ([`Rule`]): CIDR blocks or addresses, host names (`hooks.example.com`, or
//! `*.example.com` for every name below it, not the name itself) and ports (`:25`,
//! `:8000-8999`). The deny list always wins. With an allow list, only what it names is allowed:
//! if it has ports, the port must be one of them; if it has hosts or blocks, the host must be one
//! of the names or every address it resolves to must be in one of the blocks.
//!
//! Notations: addresses are compared after the `url` crate's host parsing, which turns decimal
//! (`2852039166`), octal, hexadecimal and shortened (`127.1`) IPv4, percent-encoded and
//! full-width digits into one address; an IPv4 address inside IPv6 (mapped `::ffff:a.b.c.d`,
//! compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) is checked as IPv6 *and* as IPv4; trailing
//! dots of names are ignored; the host of `http://a@b/` is `b`. Zone ids (`fe80::1%eth0`) are
//! not valid in URLs and never reach the policy.
//!
//! A check allocates nothing: it compares the host and each address with a few short lists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// One entry of a deny or allow list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// An address or a CIDR block.
    Net(IpNet),
    /// A host name, exactly (lower case, without trailing dots).
    Host(String),
    /// Every name below a domain: `*.example.com` is stored as `.example.com`.
    Suffix(String),
    /// A port range, inclusive (`:443` is `443..=443`).
    Ports(u16, u16),
}

/// A list entry that is none of an address, a CIDR block, a host name, `*.suffix` or `:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an address, CIDR block, host name, *.suffix or :port (e.g. 10.0.0.0/8, ::1, hooks.example.com, *.example.com, :25, :8000-8999)"
)]
pub struct InvalidRule(String);

impl FromStr for Rule {
    type Err = InvalidRule;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidRule(raw.to_owned());
        let s = raw.trim();
        if s.is_empty() {
            return Err(invalid());
        }
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Self::Net(IpNet::from(ip)));
        }
        if s.contains('/') {
            let net: IpNet = s.parse().map_err(|_| invalid())?;
            return Ok(Self::Net(net.trunc()));
        }
        if let Some(ports) = s.strip_prefix(':') {
            let (lo, hi) = ports.split_once('-').unwrap_or((ports, ports));
            let lo: u16 = lo.trim().parse().map_err(|_| invalid())?;
            let hi: u16 = hi.trim().parse().map_err(|_| invalid())?;
            return if lo <= hi {
                Ok(Self::Ports(lo, hi))
            } else {
                Err(invalid())
            };
        }
        if let Some(domain) = s.strip_prefix("*.") {
            return match url::Host::parse(domain) {
                Ok(url::Host::Domain(d)) if valid_name(&d) => {
                    Ok(Self::Suffix(format!(".{}", trim_dots(&d))))
                }
                _ => Err(invalid()),
            };
        }
        // The URL host parser: `127.1` and `0x7f.1` are addresses here too, as in a URL.
        match url::Host::parse(s) {
            Ok(url::Host::Ipv4(a)) => Ok(Self::Net(IpNet::from(IpAddr::V4(a)))),
            Ok(url::Host::Ipv6(a)) => Ok(Self::Net(IpNet::from(IpAddr::V6(a)))),
            Ok(url::Host::Domain(d)) if valid_name(&d) => Ok(Self::Host(trim_dots(&d).to_owned())),
            _ => Err(invalid()),
        }
    }
}

/// Parses one list entry.
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    s.parse().map_err(|e: InvalidRule| e.to_string())
}

/// A comma-separated list of entries, as a flag or an environment variable gives it (clap
/// value parser). Empty entries are skipped, so an empty variable is an empty list.
pub fn parse_rules(s: &str) -> Result<Vec<Rule>, String> {
    s.split(',')
        .filter(|entry| !entry.trim().is_empty())
        .map(parse_rule)
        .collect()
}

fn valid_name(d: &str) -> bool {
    let d = trim_dots(d);
    !d.is_empty()
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

fn trim_dots(name: &str) -> &str {
    name.trim_end_matches('.')
}

/// Why a destination is refused. The text names the rule, never the destination: it may be
/// written into records and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not `http` or `https`.
    #[error("scheme is not http or https")]
    Scheme,
    /// No host in the URL.
    #[error("no host")]
    NoHost,
    /// `169.254.0.0/16`, `fe80::/10`.
    #[error("link-local address (cloud metadata services live there), refused by default")]
    LinkLocal,
    /// A cloud metadata address outside the link-local ranges.
    #[error("cloud metadata address, refused by default")]
    Metadata,
    /// `0.0.0.0/8`, `::`.
    #[error("unspecified address, refused by default")]
    Unspecified,
    /// `224.0.0.0/4`, `ff00::/8`.
    #[error("multicast address, refused by default")]
    Multicast,
    /// `255.255.255.255`.
    #[error("broadcast address, refused by default")]
    Broadcast,
    /// In a CIDR block of the deny list.
    #[error("address in the deny list")]
    DeniedAddress,
    /// A name of the deny list.
    #[error("host name in the deny list")]
    DeniedHost,
    /// A port of the deny list.
    #[error("port in the deny list")]
    DeniedPort,
    /// An allow list is set and the host (name or addresses) is not in it.
    #[error("host not in the allow list")]
    HostNotAllowed,
    /// An allow list with ports is set and the port is not one of them.
    #[error("port not in the allow list")]
    PortNotAllowed,
}

#[derive(Debug, Clone, Default)]
struct Rules {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
    suffixes: Vec<String>,
    ports: Vec<(u16, u16)>,
}

impl Rules {
    fn from(rules: &[Rule]) -> Self {
        let mut out = Self::default();
        for rule in rules {
            match rule {
                Rule::Net(n) => out.nets.push(*n),
                Rule::Host(h) => out.hosts.push(h.to_ascii_lowercase()),
                Rule::Suffix(s) => out.suffixes.push(s.to_ascii_lowercase()),
                Rule::Ports(lo, hi) => out.ports.push((*lo, *hi)),
            }
        }
        out
    }

    fn names_host(&self, name: &str) -> bool {
        let name = trim_dots(name).as_bytes();
        self.hosts
            .iter()
            .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
            || self.suffixes.iter().any(|s| {
                let s = s.as_bytes();
                name.len() > s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s)
            })
    }

    fn has_port(&self, port: u16) -> bool {
        self.ports
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&port))
    }

    fn has_address(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }

    fn constrains_hosts(&self) -> bool {
        !self.nets.is_empty() || !self.hosts.is_empty() || !self.suffixes.is_empty()
    }
}

/// The policy: built-in refusals, the operator's deny list and optional allow list.
/// [`EgressPolicy::default`] is the built-in refusals alone.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    deny: Rules,
    allow: Option<Rules>,
    /// Allow blocks lying inside a range refused by default: explicit opt-ins.
    opt_in: Vec<IpNet>,
}

impl EgressPolicy {
    /// A policy from a deny list and an allow list (empty: no allow list).
    pub fn new(deny: &[Rule], allow: &[Rule]) -> Self {
        let allow = (!allow.is_empty()).then(|| Rules::from(allow));
        let opt_in = allow
            .iter()
            .flat_map(|a| a.nets.iter())
            .filter(|n| inside_default_range(n))
            .copied()
            .collect();
        Self {
            deny: Rules::from(deny),
            allow,
            opt_in,
        }
    }

    /// The static check of a URL: scheme, port, the host name against the lists, an address
    /// literal against everything. A host name that passes is still to be checked address by
    /// address once resolved ([`EgressPolicy::check_resolved`]).
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refusal> {
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(Refusal::Scheme);
        }
        let port = url.port_or_known_default().ok_or(Refusal::NoHost)?;
        self.check_port(port)?;
        match url.host().ok_or(Refusal::NoHost)? {
            url::Host::Ipv4(a) => self.check_address(None, IpAddr::V4(a)),
            url::Host::Ipv6(a) => self.check_address(None, IpAddr::V6(a)),
            // The URL parser reads a host with two or more trailing dots (`169.254.169.254..`)
            // as a name; with its dots trimmed, as every name here is, it is an address.
            url::Host::Domain(d) => match url::Host::parse(trim_dots(d)) {
                Ok(url::Host::Ipv4(a)) => self.check_address(None, IpAddr::V4(a)),
                _ => self.check_name(d),
            },
        }
    }

    /// The port against the lists.
    pub fn check_port(&self, port: u16) -> Result<(), Refusal> {
        if self.deny.has_port(port) {
            return Err(Refusal::DeniedPort);
        }
        match &self.allow {
            Some(allow) if !allow.ports.is_empty() && !allow.has_port(port) => {
                Err(Refusal::PortNotAllowed)
            }
            _ => Ok(()),
        }
    }

    /// A host name (not an address literal) against the lists: what can be known before it is
    /// resolved.
    pub fn check_name(&self, name: &str) -> Result<(), Refusal> {
        if self.deny.names_host(name) {
            return Err(Refusal::DeniedHost);
        }
        match &self.allow {
            // Only names allowed, and not this one: no address can save it.
            Some(allow)
                if allow.constrains_hosts() && allow.nets.is_empty() && !allow.names_host(name) =>
            {
                Err(Refusal::HostNotAllowed)
            }
            _ => Ok(()),
        }
    }

    /// One address `name` resolved to, at connect time: the name, then the address.
    pub fn check_resolved(&self, name: &str, ip: IpAddr) -> Result<(), Refusal> {
        self.check_name(name)?;
        self.check_address(Some(name), ip)
    }

    /// What a connection to `host:port` at `ip` needs: `host` is a name or an address literal
    /// (IPv6 with or without brackets), `ip` the address about to be connected to.
    pub fn check_endpoint(&self, host: &str, port: u16, ip: IpAddr) -> Result<(), Refusal> {
        self.check_port(port)?;
        let unbracketed = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match unbracketed.parse::<IpAddr>() {
            Ok(literal) => {
                self.check_address(None, literal)?;
                if literal == ip {
                    Ok(())
                } else {
                    self.check_address(None, ip)
                }
            }
            Err(_) => self.check_resolved(host, ip),
        }
    }

    /// An address, reached through `name` (`None`: written as a literal).
    pub fn check_address(&self, name: Option<&str>, ip: IpAddr) -> Result<(), Refusal> {
        let embedded = embedded_v4(ip).map(IpAddr::V4);
        for form in std::iter::once(ip).chain(embedded) {
            if let Some(refusal) = default_refusal(form)
                && !self.opt_in.iter().any(|n| n.contains(&form))
            {
                return Err(refusal);
            }
            if self.deny.has_address(form) {
                return Err(Refusal::DeniedAddress);
            }
        }
        if let Some(allow) = &self.allow
            && allow.constrains_hosts()
        {
            let by_name = name.is_some_and(|n| allow.names_host(n));
            let by_address =
                allow.has_address(ip) || embedded.is_some_and(|v4| allow.has_address(v4));
            if !by_name && !by_address {
                return Err(Refusal::HostNotAllowed);
            }
        }
        Ok(())
    }
}

/// The IPv4 address inside an IPv6 one that reaches it: mapped (`::ffff:a.b.c.d`), compatible
/// (`::a.b.c.d`, deprecated but still routed by some stacks) or NAT64 (`64:ff9b::a.b.c.d`).
pub fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low = Ipv4Addr::new(
        (s[6] >> 8) as u8,
        (s[6] & 0xff) as u8,
        (s[7] >> 8) as u8,
        (s[7] & 0xff) as u8,
    );
    let compatible = s[..6] == [0; 6] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST;
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (compatible || nat64).then_some(low)
}

/// The built-in refusal of an address, if any.
fn default_refusal(ip: IpAddr) -> Option<Refusal> {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if o[0] == 0 {
                Some(Refusal::Unspecified)
            } else if o[0] == 169 && o[1] == 254 {
                Some(Refusal::LinkLocal)
            } else if a.is_multicast() {
                Some(Refusal::Multicast)
            } else if a.is_broadcast() {
                Some(Refusal::Broadcast)
            } else if o == [100, 100, 100, 200] {
                Some(Refusal::Metadata)
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_unspecified() {
                Some(Refusal::Unspecified)
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some(Refusal::LinkLocal)
            } else if a.is_multicast() {
                Some(Refusal::Multicast)
            } else if s == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] {
                Some(Refusal::Metadata)
            } else {
                None
            }
        }
    }
}

/// Is the whole block inside one range refused by default (so allowing it is an explicit
/// opt-in, not a wide allow entry that happens to overlap)?
fn inside_default_range(net: &IpNet) -> bool {
    const RANGES: [(&str, u8); 8] = [
        ("0.0.0.0", 8),
        ("169.254.0.0", 16),
        ("224.0.0.0", 4),
        ("255.255.255.255", 32),
        ("100.100.100.200", 32),
        ("fe80::", 10),
        ("ff00::", 8),
        ("fd00:ec2::254", 128),
    ];
    RANGES.iter().any(|(addr, prefix)| {
        addr.parse::<IpAddr>()
            .ok()
            .and_then(|a| IpNet::new(a, *prefix).ok())
            .is_some_and(|range| range.contains(net))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn policy(deny: &[&str], allow: &[&str]) -> EgressPolicy {
        let parse = |list: &[&str]| {
            list.iter()
                .map(|r| r.parse().unwrap())
                .collect::<Vec<Rule>>()
        };
        EgressPolicy::new(&parse(deny), &parse(allow))
    }

    fn check(p: &EgressPolicy, url: &str) -> Result<(), Refusal> {
        p.check_url(&url::Url::parse(url).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_notation_of_the_metadata_address_is_refused_by_default() {
        let p = EgressPolicy::default();
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://2852039166/",
            "http://0251.0376.0251.0376/",
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://0xa9fea9fe/",
            "http://025177524776/",
            "http://169.254.43518/",
            "http://169.16689662/",
            "http://169.254.169.254./",
            "http://%31%36%39.254.169.254/",
            "http://\u{ff11}\u{ff16}\u{ff19}.254.169.254/",
            "http://169\u{3002}254\u{3002}169\u{3002}254/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[0:0:0:0:0:ffff:169.254.169.254]/",
            "http://[::169.254.169.254]/",
            "http://[64:ff9b::169.254.169.254]/",
            "http://user:pass@169.254.169.254/",
            "http://allowed.example@169.254.169.254/",
            "http://169.254.169.254\\@allowed.example/",
            "http:/\\169.254.169.254/",
            "HTTP://169.254.169.254:8080/",
            "https://169.254.169.254/",
        ] {
            assert_eq!(check(&p, url), Err(Refusal::LinkLocal), "{url}");
        }
    }

    /// Found by the `callback_url` fuzz target: with two trailing dots an address was a name
    /// to the URL parser, and passed.
    #[test]
    fn fuzz_regression_addresses_with_trailing_dots_are_addresses() {
        let p = EgressPolicy::default();
        for (url, refusal) in [
            ("http://169.254.169.254../", Refusal::LinkLocal),
            ("http://169.254.169.254....//0x0xa9@", Refusal::LinkLocal),
            ("http://0xa9fea9fe.../", Refusal::LinkLocal),
            ("http://2852039166../", Refusal::LinkLocal),
            ("http://100.100.100.200../", Refusal::Metadata),
            ("http://0.0.0.0../", Refusal::Unspecified),
            ("http://224.0.0.1../", Refusal::Multicast),
        ] {
            assert_eq!(check(&p, url), Err(refusal), "{url}");
        }
        let denied = policy(&["127.0.0.0/8"], &[]);
        assert_eq!(
            check(&denied, "http://127.0.0.1../"),
            Err(Refusal::DeniedAddress)
        );
        assert_eq!(check(&p, "http://127.0.0.1../"), Ok(()));
        assert_eq!(check(&p, "http://hooks.example.com../"), Ok(()));
    }

    #[test]
    fn the_other_default_classes() {
        let p = EgressPolicy::default();
        for (url, refusal) in [
            ("http://[fe80::1]/", Refusal::LinkLocal),
            ("http://[febf::1]/", Refusal::LinkLocal),
            ("http://[fd00:ec2::254]/", Refusal::Metadata),
            ("http://100.100.100.200/", Refusal::Metadata),
            ("http://0.0.0.0/", Refusal::Unspecified),
            ("http://0/", Refusal::Unspecified),
            ("http://0.1.2.3/", Refusal::Unspecified),
            ("http://[::]/", Refusal::Unspecified),
            ("http://[::ffff:0.0.0.0]/", Refusal::Unspecified),
            ("http://224.0.0.1/", Refusal::Multicast),
            ("http://239.255.255.250/", Refusal::Multicast),
            ("http://[ff02::1]/", Refusal::Multicast),
            ("http://[::ffff:224.0.0.1]/", Refusal::Multicast),
            ("http://255.255.255.255/", Refusal::Broadcast),
        ] {
            assert_eq!(check(&p, url), Err(refusal), "{url}");
        }
        assert_eq!(check(&p, "ftp://example.com/"), Err(Refusal::Scheme));
    }

    #[test]
    fn loopback_private_and_public_are_allowed_by_default() {
        let p = EgressPolicy::default();
        for url in [
            "http://127.0.0.1:8082/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://10.1.2.3/",
            "http://192.168.1.1/",
            "http://172.16.0.1/",
            "http://[fd12::1]/",
            "http://[fd00:ec2::253]/",
            "https://hooks.example.com/x",
            "http://localhost:9000/",
            "http://100.64.0.1/",
            "http://169.255.0.1/",
            "http://[fec0::1]/",
        ] {
            assert_eq!(check(&p, url), Ok(()), "{url}");
        }
        // ::1 is loopback, not the compatible form of 0.0.0.1.
        assert_eq!(embedded_v4(ip("::1")), None);
        assert_eq!(embedded_v4(ip("::")), None);
        assert_eq!(embedded_v4(ip("::7f00:1")), Some(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn loopback_and_private_ranges_can_be_locked_down() {
        let p = policy(
            &[
                "127.0.0.0/8",
                "::1",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "fc00::/7",
            ],
            &[],
        );
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://10.0.0.1/",
            "http://012.0.0.1/",
            "http://[::ffff:192.168.0.1]/",
            "http://[fd12::1]/",
        ] {
            assert_eq!(check(&p, url), Err(Refusal::DeniedAddress), "{url}");
        }
        assert_eq!(check(&p, "https://hooks.example.com/"), Ok(()));
        // A name is decided when it resolves.
        assert_eq!(check(&p, "http://localhost/"), Ok(()));
        assert_eq!(
            p.check_resolved("localhost", ip("127.0.0.1")),
            Err(Refusal::DeniedAddress)
        );
        assert_eq!(
            p.check_resolved("rebind.example", ip("::ffff:10.0.0.7")),
            Err(Refusal::DeniedAddress)
        );
        assert_eq!(
            p.check_resolved("hooks.example.com", ip("93.184.215.14")),
            Ok(())
        );
    }

    #[test]
    fn deny_lists_of_names_and_ports() {
        let p = policy(
            &[
                "metadata.google.internal",
                "*.internal.example",
                ":25",
                ":6000-6999",
            ],
            &[],
        );
        for (url, refusal) in [
            ("http://metadata.google.internal/", Refusal::DeniedHost),
            ("http://METADATA.google.internal./", Refusal::DeniedHost),
            ("http://metadata.google.internal../", Refusal::DeniedHost),
            ("http://a.internal.example/", Refusal::DeniedHost),
            ("http://a.b.Internal.Example./", Refusal::DeniedHost),
            ("http://hooks.example.com:25/", Refusal::DeniedPort),
            ("http://hooks.example.com:6379/", Refusal::DeniedPort),
        ] {
            assert_eq!(check(&p, url), Err(refusal), "{url}");
        }
        // `*.suffix` is the names below it, not the suffix itself nor look-alikes.
        for url in [
            "http://internal.example/",
            "http://xinternal.example/",
            "http://hooks.example.com:7000/",
        ] {
            assert_eq!(check(&p, url), Ok(()), "{url}");
        }
        // The resolver sees the name too.
        assert_eq!(
            p.check_resolved("a.internal.example", ip("93.184.215.14")),
            Err(Refusal::DeniedHost)
        );
    }

    #[test]
    fn an_allow_list_allows_only_what_it_names() {
        let p = policy(
            &["bad.hooks.example"],
            &["*.hooks.example", "10.20.0.0/16", ":443", ":8443"],
        );
        assert_eq!(check(&p, "https://a.hooks.example/"), Ok(()));
        assert_eq!(check(&p, "http://a.hooks.example:8443/"), Ok(()));
        assert_eq!(check(&p, "https://10.20.1.1/"), Ok(()));
        assert_eq!(check(&p, "https://[::ffff:10.20.1.1]/"), Ok(()));
        assert_eq!(
            check(&p, "http://a.hooks.example/"),
            Err(Refusal::PortNotAllowed)
        );
        assert_eq!(
            check(&p, "https://127.0.0.1/"),
            Err(Refusal::HostNotAllowed)
        );
        assert_eq!(
            check(&p, "https://bad.hooks.example/"),
            Err(Refusal::DeniedHost)
        );
        // A name outside the names may still resolve into an allowed block.
        assert_eq!(check(&p, "https://other.example/"), Ok(()));
        assert_eq!(p.check_resolved("other.example", ip("10.20.3.4")), Ok(()));
        assert_eq!(
            p.check_resolved("other.example", ip("10.21.3.4")),
            Err(Refusal::HostNotAllowed)
        );
        // An allowed name resolving to a refused address is still refused.
        assert_eq!(
            p.check_resolved("a.hooks.example", ip("169.254.169.254")),
            Err(Refusal::LinkLocal)
        );
        assert_eq!(p.check_resolved("a.hooks.example", ip("127.0.0.1")), Ok(()));

        // Names only: another name is refused before any lookup.
        let names = policy(&[], &["hooks.example"]);
        assert_eq!(check(&names, "http://hooks.example./x"), Ok(()));
        assert_eq!(
            check(&names, "http://other.example/"),
            Err(Refusal::HostNotAllowed)
        );
        assert_eq!(
            check(&names, "http://127.0.0.1/"),
            Err(Refusal::HostNotAllowed)
        );
        // Ports only: any host on those ports.
        let ports = policy(&[], &[":443"]);
        assert_eq!(check(&ports, "https://anything.example/"), Ok(()));
        assert_eq!(
            check(&ports, "http://anything.example/"),
            Err(Refusal::PortNotAllowed)
        );
    }

    #[test]
    fn only_a_narrow_allow_entry_opts_a_default_range_back_in() {
        let wide = policy(&[], &["0.0.0.0/0", "::/0"]);
        assert_eq!(
            check(&wide, "http://169.254.169.254/"),
            Err(Refusal::LinkLocal)
        );
        assert_eq!(check(&wide, "http://[fe80::1]/"), Err(Refusal::LinkLocal));
        assert_eq!(check(&wide, "http://10.0.0.1/"), Ok(()));
        let narrow = policy(&[], &["169.254.10.0/24"]);
        assert_eq!(check(&narrow, "http://169.254.10.9/"), Ok(()));
        assert_eq!(
            check(&narrow, "http://169.254.169.254/"),
            Err(Refusal::LinkLocal)
        );
        // The deny list still wins.
        let both = policy(&["169.254.10.9"], &["169.254.10.0/24"]);
        assert_eq!(
            check(&both, "http://169.254.10.9/"),
            Err(Refusal::DeniedAddress)
        );
    }

    #[test]
    fn endpoints_check_literals_and_names() {
        let p = policy(&["127.0.0.0/8"], &[]);
        assert_eq!(
            p.check_endpoint("127.0.0.1", 80, ip("127.0.0.1")),
            Err(Refusal::DeniedAddress)
        );
        assert_eq!(
            p.check_endpoint("[::ffff:127.0.0.1]", 80, ip("::ffff:127.0.0.1")),
            Err(Refusal::DeniedAddress)
        );
        assert_eq!(
            p.check_endpoint("localhost", 80, ip("127.0.0.1")),
            Err(Refusal::DeniedAddress)
        );
        assert_eq!(p.check_endpoint("localhost", 80, ip("10.0.0.1")), Ok(()));
        assert_eq!(
            p.check_endpoint("fn.example", 80, ip("169.254.169.254")),
            Err(Refusal::LinkLocal)
        );
    }

    #[test]
    fn rules_parse_in_every_notation_and_refuse_garbage() {
        assert_eq!(
            "10.1.2.3/8".parse::<Rule>().unwrap(),
            Rule::Net("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            "::1".parse::<Rule>().unwrap(),
            Rule::Net("::1/128".parse().unwrap())
        );
        assert_eq!(
            "[::1]".parse::<Rule>().unwrap(),
            Rule::Net("::1/128".parse().unwrap())
        );
        assert_eq!(
            "127.1".parse::<Rule>().unwrap(),
            Rule::Net("127.0.0.1/32".parse().unwrap())
        );
        assert_eq!(
            " Hooks.Example.COM. ".parse::<Rule>().unwrap(),
            Rule::Host("hooks.example.com".into())
        );
        assert_eq!(
            "*.Example.com".parse::<Rule>().unwrap(),
            Rule::Suffix(".example.com".into())
        );
        assert_eq!(":25".parse::<Rule>().unwrap(), Rule::Ports(25, 25));
        assert_eq!(
            ":8000-8999".parse::<Rule>().unwrap(),
            Rule::Ports(8000, 8999)
        );
        assert_eq!(parse_rules("").unwrap(), []);
        assert_eq!(parse_rules(" 10.0.0.0/8, ,:25,").unwrap().len(), 2);
        assert!(parse_rules("10.0.0.0/8,nonsense!").is_err());
        for bad in [
            "",
            " ",
            ":",
            ":x",
            ":70000",
            ":9-1",
            "10.0.0.0/33",
            "a/b",
            "*.",
            "*",
            "a.*.b",
            "http://x/",
            "host:80",
            "a b",
            "[::1",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?}");
        }
    }
}
