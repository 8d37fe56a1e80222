//! `iii-http-functions`: the settings of HTTP-invoked functions, and the destination networks
//! they may reach.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// The `iii-http-functions` block. Every key has a default, so an absent block means "on,
/// loopback destinations only".
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFunctionsConfig {
    /// `false`: registrations with `invocation` are ignored with a warning (as the reference
    /// without the module).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Destination addresses a request may connect to, as IP addresses or CIDR networks
    /// (`10.0.0.0/8`, `::1/128`). Checked on the addresses a host name resolves to, at each
    /// connection, so a name cannot lead to an address outside the list.
    #[serde(default = "default_allowed_networks")]
    pub allowed_networks: Vec<String>,
    /// Threads that run HTTP requests (each request occupies one while it runs).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Requests handed to the threads and not started yet, over all functions; past this a
    /// call fails with `http_queue_full`.
    #[serde(default = "default_max_pending_requests")]
    pub max_pending_requests: usize,
    /// Requests of one function running at once.
    #[serde(default = "default_max_concurrency_per_function")]
    pub max_concurrency_per_function: usize,
    /// Calls of one function waiting for one of its running slots; past this a call fails
    /// with `http_queue_full`.
    #[serde(default = "default_max_queue_per_function")]
    pub max_queue_per_function: usize,
    /// Request bodies held by calls not answered yet (waiting, queued or running), over all
    /// functions; a call that would pass it fails with `http_queue_full` (a call is always
    /// accepted when none is held).
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: usize,
    /// Largest response body read; a larger one fails the call with `http_response_failed`.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Limit of a request whose registration gives no `timeout_ms`.
    #[serde(default = "default_timeout_ms")]
    pub default_timeout_ms: u64,
    /// Largest `timeout_ms` a registration may ask for; a larger one is refused.
    #[serde(default = "default_max_timeout_ms")]
    pub max_timeout_ms: u64,
    /// Idle keep-alive connections kept per destination host.
    #[serde(default = "default_max_idle_per_host")]
    pub max_idle_connections_per_host: usize,
    /// The reference's URL checks (`require_https`, `block_private_ips`, `url_allowlist`):
    /// accepted so its config files load, not used (ringcast checks `allowed_networks`).
    #[serde(default, skip_serializing)]
    pub security: Option<serde_yaml::Value>,
}

impl Default for HttpFunctionsConfig {
    fn default() -> Self {
        HttpFunctionsConfig {
            enabled: default_enabled(),
            allowed_networks: default_allowed_networks(),
            threads: default_threads(),
            max_pending_requests: default_max_pending_requests(),
            max_concurrency_per_function: default_max_concurrency_per_function(),
            max_queue_per_function: default_max_queue_per_function(),
            max_buffered_bytes: default_max_buffered_bytes(),
            max_response_bytes: default_max_response_bytes(),
            default_timeout_ms: default_timeout_ms(),
            max_timeout_ms: default_max_timeout_ms(),
            max_idle_connections_per_host: default_max_idle_per_host(),
            security: None,
        }
    }
}

impl HttpFunctionsConfig {
    /// Checks the values serde cannot: returns the offending key and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for entry in &self.allowed_networks {
            Network::parse(entry).map_err(|why| ("allowed_networks", why))?;
        }
        for (key, value) in [
            ("threads", self.threads),
            ("max_pending_requests", self.max_pending_requests),
            ("max_concurrency_per_function", self.max_concurrency_per_function),
            ("max_response_bytes", self.max_response_bytes),
        ] {
            if value == 0 {
                return Err((key, "must be at least 1".to_string()));
            }
        }
        if self.threads > 1024 {
            return Err(("threads", "must be at most 1024".to_string()));
        }
        if self.default_timeout_ms == 0 {
            return Err(("default_timeout_ms", "must be at least 1".to_string()));
        }
        if self.max_timeout_ms < self.default_timeout_ms {
            return Err(("max_timeout_ms", format!("must be at least default_timeout_ms ({})", self.default_timeout_ms)));
        }
        // A deadline this far ahead is still representable everywhere.
        if self.max_timeout_ms > 86_400_000 {
            return Err(("max_timeout_ms", "must be at most 86400000 (a day)".to_string()));
        }
        Ok(())
    }

    /// The parsed `allowed_networks` (entries that do not parse are left out; [`validate`]
    /// refuses them at start-up).
    ///
    /// [`validate`]: HttpFunctionsConfig::validate
    pub fn networks(&self) -> Vec<Network> {
        self.allowed_networks.iter().filter_map(|n| Network::parse(n).ok()).collect()
    }
}

/// One entry of `allowed_networks`: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// `1.2.3.4`, `1.2.3.0/24`, `::1`, `fd00::/8`.
    pub fn parse(text: &str) -> Result<Network, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?} is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("{text:?}: the prefix length must be 0 to {max}")),
            },
        };
        Ok(Network { addr, prefix })
    }

    /// Whether `ip` lies in this network. IPv4-mapped IPv6 addresses count as their IPv4 form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn default_enabled() -> bool {
    true
}
fn default_allowed_networks() -> Vec<String> {
    vec!["127.0.0.0/8".to_string(), "::1/128".to_string()]
}
fn default_threads() -> usize {
    16
}
fn default_max_pending_requests() -> usize {
    1024
}
fn default_max_concurrency_per_function() -> usize {
    8
}
fn default_max_queue_per_function() -> usize {
    256
}
fn default_max_buffered_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_response_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_timeout_ms() -> u64 {
    30_000
}
fn default_max_timeout_ms() -> u64 {
    300_000
}
fn default_max_idle_per_host() -> usize {
    8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_contain_what_their_prefix_covers() {
        let lo = Network::parse("127.0.0.0/8").unwrap();
        assert!(lo.contains(ip("127.1.2.3")));
        assert!(!lo.contains(ip("128.0.0.1")));
        assert!(lo.contains(ip("::ffff:127.0.0.1")), "IPv4-mapped IPv6 is its IPv4 address");
        assert!(!lo.contains(ip("::1")));
        let one = Network::parse("10.1.2.3").unwrap();
        assert!(one.contains(ip("10.1.2.3")) && !one.contains(ip("10.1.2.4")));
        let all = Network::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let ula = Network::parse("fd00::/8").unwrap();
        assert!(ula.contains(ip("fd12::1")) && !ula.contains(ip("fe80::1")));
    }

    #[test]
    fn bad_entries_are_refused_naming_them() {
        assert!(Network::parse("localhost").unwrap_err().contains("localhost"));
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("::/129").is_err());
        let config = HttpFunctionsConfig { allowed_networks: vec!["10.0.0.0/8".into(), "nope".into()], ..Default::default() };
        assert_eq!(config.validate().unwrap_err().0, "allowed_networks");
    }
}
