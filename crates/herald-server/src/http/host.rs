//! The `Host` check that keeps DNS rebinding away from the development modes.
//!
//! A page on `evil.example` whose name is made to resolve to this server is, to the browser,
//! same-origin with it: its requests carry `Origin: http://evil.example:8080` and
//! `Host: evil.example:8080`, which the Origin check accepts. In the development modes
//! (`auth.anonymous`, `auth.dev_login`) such a page could then act as any user, so there the
//! `Host` must name this server: a loopback name or address, the listen address, or one of
//! `server.allowed_hosts`. That list, when set, is enforced in every mode.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};

use super::HttpError;
use crate::config::Config;

/// Which `Host` values the server answers, built once from the config.
pub struct HostPolicy {
    /// `server.allowed_hosts`, lower-cased.
    listed: Vec<String>,
    /// With no list, in a development mode: loopback and this address only.
    listen: IpAddr,
}

impl HostPolicy {
    /// `None` when every `Host` is answered (no list, no development mode).
    pub fn from_config(config: &Config) -> Option<Arc<HostPolicy>> {
        let development = config.auth.anonymous || config.auth.dev_login;
        if config.server.allowed_hosts.is_empty() && !development {
            return None;
        }
        Some(Arc::new(HostPolicy {
            listed: config
                .server
                .allowed_hosts
                .iter()
                .map(|host| host.to_ascii_lowercase())
                .collect(),
            listen: config.server.listen.ip(),
        }))
    }

    fn allows(&self, host_header: &str) -> bool {
        let host = strip_port(host_header).to_ascii_lowercase();
        if !self.listed.is_empty() {
            return self.listed.contains(&host);
        }
        let address = host.trim_start_matches('[').trim_end_matches(']');
        match address.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback() || ip == self.listen,
            Err(_) => host == "localhost",
        }
    }
}

/// `example.com:8080` → `example.com`, `[::1]:8080` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Refuses requests whose `Host` the policy does not allow, with 421 Misdirected Request.
pub async fn check(
    State(policy): State<Arc<HostPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !policy.allows(host) {
        metrics::counter!("herald_handshakes_refused_total", "reason" => "host").increment(1);
        return HttpError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!("host {host:?} is not served here (see server.allowed_hosts)"),
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(listed: &[&str]) -> HostPolicy {
        HostPolicy {
            listed: listed.iter().map(|h| h.to_string()).collect(),
            listen: "192.0.2.10".parse().unwrap(),
        }
    }

    #[test]
    fn without_a_list_only_loopback_and_the_listen_address_pass() {
        let policy = policy(&[]);
        for host in [
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "192.0.2.10",
            "LOCALHOST",
        ] {
            assert!(policy.allows(host), "{host}");
        }
        for host in [
            "evil.example:8080",
            "",
            "192.0.2.11:8080",
            "localhost.evil.example",
        ] {
            assert!(!policy.allows(host), "{host}");
        }
    }

    #[test]
    fn a_list_replaces_the_defaults() {
        let policy = policy(&["chat.example"]);
        assert!(policy.allows("Chat.Example:443"));
        assert!(!policy.allows("localhost:8080"));
    }
}
