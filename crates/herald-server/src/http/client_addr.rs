//! The client's address: the socket's peer, or, when that peer is a trusted reverse proxy
//! (`server.trusted_proxies`), the address the proxies recorded in the configured header
//! (`server.client_address_header`).
//!
//! A proxy appends the address it received the request from to the header, so the list reads
//! client-first and each entry was written by the hop to its right. Only entries written by
//! trusted proxies can be believed: the walk goes from the right, skips trusted hops, and stops
//! at the first untrusted one. Anything to its left came from the client and may be forged.
//!
//! One header is read, never both: a proxy that maintains `X-Forwarded-For` passes a
//! client's own `Forwarded` header through untouched, so reading the other one would let the
//! client choose its address.

use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Which header trusted proxies record the client's address in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1` (nginx `$proxy_add_x_forwarded_for`, most balancers).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// The address of the client behind `peer`.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ForwardedHeader,
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let name = match header {
        ForwardedHeader::XForwardedFor => "x-forwarded-for",
        ForwardedHeader::Forwarded => http::header::FORWARDED.as_str(),
    };
    // Several header lines form one list, in order.
    let hops: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let address = match header {
            ForwardedHeader::XForwardedFor => parse_node(hop.trim()),
            ForwardedHeader::Forwarded => forwarded_for(hop),
        };
        // An entry that names no address (`unknown`, an obfuscated `_id`, garbage): the
        // nearest address known for certain is the trusted hop that wrote it.
        let Some(address) = address else { break };
        client = address;
        if !is_trusted(&address) {
            break;
        }
    }
    client
}

/// The key the per-address limits count under: an IPv4 address, or an IPv6 address's /64,
/// which one subscriber usually holds whole.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// The `for=` parameter of one `Forwarded` element (`for=192.0.2.1;proto=https`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_node(value.trim().trim_matches('"')))
            .flatten()
    })
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, _port) = rest.split_once(']')?;
        return ip.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    }
    let (ip, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn proxies() -> Vec<IpNet> {
        vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let xff = headers("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.2");
        let client = client_ip(
            ip("10.0.0.1"),
            &xff,
            &proxies(),
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(client, ip("203.0.113.7"));
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let xff = headers("x-forwarded-for", "203.0.113.7");
        let client = client_ip(
            ip("198.51.100.1"),
            &xff,
            &proxies(),
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(client, ip("198.51.100.1"));
    }

    #[test]
    fn only_the_configured_header_is_read() {
        let mut both = headers("forwarded", "for=6.6.6.6");
        both.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        let peer = ip("10.0.0.1");
        assert_eq!(
            client_ip(peer, &both, &proxies(), ForwardedHeader::XForwardedFor),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(peer, &both, &proxies(), ForwardedHeader::Forwarded),
            ip("6.6.6.6")
        );
    }

    #[test]
    fn forwarded_elements_with_ports_quotes_and_parameters_are_read() {
        let forwarded = headers(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https, for=10.0.0.3",
        );
        let client = client_ip(
            ip("::1"),
            &forwarded,
            &proxies(),
            ForwardedHeader::Forwarded,
        );
        assert_eq!(client, ip("2001:db8::7"));
    }

    #[test]
    fn an_unreadable_hop_stops_at_the_trusted_proxy_that_wrote_it() {
        let xff = headers("x-forwarded-for", "203.0.113.7, unknown, 10.0.0.2");
        let client = client_ip(
            ip("10.0.0.1"),
            &xff,
            &proxies(),
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(client, ip("10.0.0.2"));
        let none = client_ip(
            ip("10.0.0.1"),
            &HeaderMap::new(),
            &proxies(),
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(none, ip("10.0.0.1"));
    }

    #[test]
    fn ipv6_addresses_are_limited_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("2001:db8:1:2:ffff::9")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(limit_key(ip("192.0.2.1")), ip("192.0.2.1"));
    }
}
