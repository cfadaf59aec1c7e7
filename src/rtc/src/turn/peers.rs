//! Which peers a relay may talk to. A TURN server relays from a public address, so
//! without a policy any user with credentials could reach the server's own loopback
//! services and the private networks behind it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

pub(crate) struct PeerPolicy {
    allowed: Vec<IpNet>,
    deny_private: bool,
    relay_ip: IpAddr,
}

impl PeerPolicy {
    pub(crate) fn new(allowed: Vec<IpNet>, deny_private: bool, relay_ip: IpAddr) -> Self {
        PeerPolicy { allowed, deny_private, relay_ip }
    }

    pub(crate) fn is_denied(&self, ip: IpAddr) -> bool {
        if self.is_allowed(ip) {
            return false;
        }
        self.deny_private && (is_non_public(ip) || same_host(ip, self.relay_ip))
    }

    fn is_allowed(&self, ip: IpAddr) -> bool {
        let embedded = embedded_v4(ip).map(IpAddr::V4);
        self.allowed
            .iter()
            .any(|net| net.contains(&ip) || embedded.is_some_and(|v4| net.contains(&v4)))
    }
}

fn same_host(a: IpAddr, b: IpAddr) -> bool {
    let canonical = |ip: IpAddr| embedded_v4(ip).map_or(ip, IpAddr::V4);
    canonical(a) == canonical(b)
}

fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_non_public_v4(v4),
        IpAddr::V6(v6) => is_non_public_v6(v6) || embedded_v4(ip).is_some_and(is_non_public_v4),
    }
}

fn is_non_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // "this network", 0.0.0.0 included
        || ip.is_loopback()
        || ip.is_private()
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0.0/24
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || ip.is_link_local()
        || ip.is_multicast()
        || a >= 240 // reserved 240.0.0.0/4, broadcast included
}

fn is_non_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let first = s[0];
    ip.is_unspecified()
        || ip.is_loopback()
        || s[..4] == [0x100, 0, 0, 0] // discard-only 100::/64
        || s[..3] == [0x64, 0xff9b, 1] // NAT64 local use 64:ff9b:1::/48, translated in-site
        || s[..2] == [0x2001, 0] // Teredo 2001::/32: reaches whatever IPv4 its relay does
        || (first & 0xfe00) == 0xfc00 // ULA fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (first & 0xffc0) == 0xfec0 // deprecated site-local fec0::/10
        || ip.is_multicast()
}

/// The IPv4 address an IPv6 address reaches, for the forms that carry one: mapped
/// (::ffff:a.b.c.d), compatible (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d) and 6to4
/// (2002:aabb:ccdd::). Without this, ::ffff:127.0.0.1 would walk past the IPv4 rules.
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    let s = v6.segments();
    let o = v6.octets();
    if s[..6] == [0, 0, 0, 0, 0, 0xffff] || s[..6] == [0; 6] {
        // ::/128 and ::1 are handled as IPv6 but also come out as 0.0.0.x here, which
        // the IPv4 rules refuse too.
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> PeerPolicy {
        PeerPolicy::new(
            allowed.iter().map(|n| n.parse().unwrap()).collect(),
            true,
            "203.0.113.7".parse().unwrap(),
        )
    }

    fn denied(policy: &PeerPolicy, ip: &str) -> bool {
        policy.is_denied(ip.parse().unwrap())
    }

    #[test]
    fn non_public_peers_are_denied() {
        let p = policy(&[]);
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "203.0.113.7",
            "::ffff:203.0.113.7",
            "192.0.0.1",
            "192.0.0.255",
            "198.18.0.1",
            "198.19.255.255",
            "::ffff:192.0.0.9",
            "::198.18.1.1",
            "64:ff9b::c612:101",
            "2002:c613:101::1",
            "64:ff9b:1::1",
            "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
            "64:ff9b:1::808:808",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "100::1",
            "100::ffff:ffff:ffff:ffff",
        ] {
            assert!(denied(&p, ip), "{ip} should be denied");
        }
    }

    #[test]
    fn public_peers_are_allowed() {
        let p = policy(&[]);
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "192.169.0.1",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "192.0.1.1",
            "191.255.255.255",
            "198.17.255.255",
            "198.20.0.1",
            "2001:200::1",
        ] {
            assert!(!denied(&p, ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn allowed_peers_win_over_the_deny_list() {
        let p = policy(&["127.0.0.0/8", "fd00::/8"]);
        assert!(!denied(&p, "127.0.0.1"));
        assert!(!denied(&p, "::ffff:127.0.0.1"));
        assert!(!denied(&p, "fd00::5"));
        assert!(denied(&p, "10.0.0.1"));
    }

    #[test]
    fn nothing_is_denied_without_the_private_policy() {
        let p = PeerPolicy::new(Vec::new(), false, "127.0.0.1".parse().unwrap());
        assert!(!p.is_denied("127.0.0.1".parse().unwrap()));
        assert!(!p.is_denied("10.0.0.1".parse().unwrap()));
    }
}
