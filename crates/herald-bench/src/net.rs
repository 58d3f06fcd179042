//! Process limits and source addresses.
//!
//! A loopback connection is identified by (source address, source port, destination): from one
//! source address the kernel runs out of ephemeral ports near 28k connections. Linux routes all
//! of 127.0.0.0/8 to the loopback interface, so for a loopback target the tool binds each
//! connection to its own source address in 127.1.0.0–127.254.255.255 before connecting.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Raises the soft open-file limit to the hard limit and returns the new soft limit.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Which source address each connection binds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAddrs {
    /// Let the kernel choose (remote targets).
    Kernel,
    /// One loopback address per connection, spread over 127.0.0.0/8.
    SpreadLoopback,
}

impl SourceAddrs {
    /// Spreads over 127.0.0.0/8 when the target is an IPv4 loopback address and `spread` is on.
    pub fn for_target(target: SocketAddr, spread: bool) -> Self {
        match target.ip() {
            IpAddr::V4(ip) if spread && ip.is_loopback() => SourceAddrs::SpreadLoopback,
            _ => SourceAddrs::Kernel,
        }
    }

    /// The address connection number `index` binds to, if any.
    pub fn for_connection(self, index: u64) -> Option<IpAddr> {
        match self {
            SourceAddrs::Kernel => None,
            SourceAddrs::SpreadLoopback => {
                // 254 × 254 × 254 addresses, avoiding .0 and .255 in every octet.
                let last = (index % 254) as u8 + 1;
                let third = ((index / 254) % 254) as u8 + 1;
                let second = ((index / (254 * 254)) % 254) as u8 + 1;
                Some(IpAddr::V4(Ipv4Addr::new(127, second, third, last)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_get_distinct_loopback_sources() {
        let spread = SourceAddrs::for_target("127.0.0.1:8080".parse().unwrap(), true);
        assert_eq!(spread, SourceAddrs::SpreadLoopback);
        let mut seen = std::collections::HashSet::new();
        for index in 0..200_000 {
            let IpAddr::V4(ip) = spread.for_connection(index).unwrap() else {
                panic!("not v4")
            };
            assert!(ip.is_loopback() && ip.octets()[3] != 0 && ip.octets()[3] != 255);
            assert!(seen.insert(ip), "{ip} used twice");
        }
    }

    #[test]
    fn remote_targets_or_spreading_off_leave_the_choice_to_the_kernel() {
        let remote = SourceAddrs::for_target("192.0.2.1:80".parse().unwrap(), true);
        assert_eq!(remote.for_connection(3), None);
        let off = SourceAddrs::for_target("127.0.0.1:80".parse().unwrap(), false);
        assert_eq!(off.for_connection(3), None);
    }
}
