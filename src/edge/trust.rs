//! Whose word about the client's address is believed: `server.trusted_proxies`, and the
//! `X-Forwarded-For` rule built on it.
//!
//! One list serves both the PROXY protocol (an L4 balancer's header) and
//! `X-Forwarded-For` (an L7 proxy's header), so there is one trust rule to reason about:
//! an address is believed only when it comes from a trusted peer.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what a dual-stack `[::]` listener sees
//! for IPv4 peers) are compared as the IPv4 address they carry.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The parsed `server.trusted_proxies`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted {
    nets: Vec<IpNet>,
}

impl Trusted {
    /// Parses CIDRs (`10.0.0.0/8`) and single addresses (`127.0.0.1`, `::1`).
    ///
    /// # Errors
    /// The first entry that is neither, quoted.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let nets = list
            .iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        format!("{s:?} is not an IP address or CIDR (e.g. \"10.0.0.0/8\")")
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { nets })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client's address for a request whose connection came from `peer` (the TCP
    /// peer, or the address a PROXY header carried).
    ///
    /// `peer` itself unless it is trusted; then the `X-Forwarded-For` entries are walked
    /// right to left (each proxy appends the address it saw) and the first one that is not
    /// trusted is the client. Entries left of it were written by the client and are never
    /// believed. An unparsable entry stops the walk at the last good address; when every
    /// entry is trusted the left-most is the answer.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.nets.is_empty() || !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        // Several X-Forwarded-For headers form one list, in order.
        let entries = headers
            .get_all("x-forwarded-for")
            .iter()
            .collect::<Vec<_>>();
        for value in entries.iter().rev() {
            let Ok(value) = value.to_str() else {
                return client;
            };
            for entry in value.rsplit(',') {
                let Some(ip) = parse_entry(entry) else {
                    return client;
                };
                client = ip;
                if !self.contains(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]` or
/// `[::1]:5678`. IPv4-mapped IPv6 is returned as IPv4.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = if let Some(rest) = entry.strip_prefix('[') {
        rest.split_once(']')?.0.parse().ok()?
    } else if let Ok(ip) = entry.parse::<IpAddr>() {
        ip
    } else {
        // `a.b.c.d:port` (a bare IPv6 address has parsed above).
        let (host, port) = entry.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        host.parse::<std::net::Ipv4Addr>().ok()?.into()
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn trusted(list: &[&str]) -> Trusted {
        Trusted::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_cidrs_and_single_addresses() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.1", "fd00::/8", " 192.168.1.7/24 "]);
        assert!(t.contains(ip("10.200.3.4")));
        assert!(t.contains(ip("127.0.0.1")));
        assert!(!t.contains(ip("127.0.0.2")));
        assert!(t.contains(ip("fd12::1")));
        assert!(t.contains(ip("192.168.1.200")), "host bits are truncated");
        assert!(
            t.contains(ip("::ffff:10.1.1.1")),
            "IPv4-mapped counts as IPv4"
        );
        assert!(!t.contains(ip("11.0.0.1")));
        for bad in ["10.0.0/8", "10.0.0.0/33", "localhost", ""] {
            let err = Trusted::parse(&[bad.to_string()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_says() {
        let t = trusted(&["10.0.0.0/8"]);
        let peer = ip("203.0.113.5");
        assert_eq!(t.client_ip(peer, &xff(&["198.51.100.1"])), peer);
        assert_eq!(Trusted::default().client_ip(peer, &xff(&["1.1.1.1"])), peer);
    }

    #[test]
    fn right_most_untrusted_entry_wins() {
        let t = trusted(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        // The client forged the first entry; its proxy appended the real one; a second
        // trusted hop appended the first proxy.
        let h = xff(&["203.0.113.66, 198.51.100.3, 10.1.2.3"]);
        assert_eq!(t.client_ip(peer, &h), ip("198.51.100.3"));
        // Split over several headers: one list.
        let h = xff(&["203.0.113.66", "198.51.100.3,10.1.2.3"]);
        assert_eq!(t.client_ip(peer, &h), ip("198.51.100.3"));
        // No header: the trusted peer itself.
        assert_eq!(t.client_ip(peer, &HeaderMap::new()), peer);
        // Every entry trusted: the left-most.
        assert_eq!(
            t.client_ip(peer, &xff(&["10.9.9.9, 10.1.1.1"])),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn entries_with_ports_brackets_and_garbage() {
        let t = trusted(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        assert_eq!(
            t.client_ip(peer, &xff(&["198.51.100.3:4711"])),
            ip("198.51.100.3")
        );
        assert_eq!(
            t.client_ip(peer, &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        assert_eq!(t.client_ip(peer, &xff(&["2001:db8::2"])), ip("2001:db8::2"));
        assert_eq!(
            t.client_ip(peer, &xff(&["::ffff:198.51.100.4"])),
            ip("198.51.100.4")
        );
        // Garbage stops the walk at the last good address: never believe what is left of it.
        assert_eq!(
            t.client_ip(peer, &xff(&["198.51.100.3, unknown, 10.1.1.1"])),
            ip("10.1.1.1")
        );
        assert_eq!(t.client_ip(peer, &xff(&["nonsense"])), peer);
        assert_eq!(t.client_ip(peer, &xff(&[""])), peer);
    }
}
