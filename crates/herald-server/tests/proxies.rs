//! Behind a reverse proxy every client arrives from the proxy's address. With the proxy listed
//! in `server.trusted_proxies`, the client's own address (from `X-Forwarded-For` or
//! `Forwarded`) is what the per-address limits count and what `GET /api/connections` shows.

mod common;

use common::pending::Pending;
use common::{Client, TestServer, refusal};
use herald_server::config::ForwardedHeader;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;

/// A token-less handshake request carrying `header: value`, as a proxy would forward it.
fn forwarded(server: &TestServer, path: &str, header: &str, value: &str) -> Request {
    let mut request = server.url(path).into_client_request().unwrap();
    request.headers_mut().insert(
        http::HeaderName::from_bytes(header.as_bytes()).unwrap(),
        value.parse().unwrap(),
    );
    request
}

async fn behind_proxy(per_ip: usize) -> TestServer {
    TestServer::start_with(|c| {
        c.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        c.limits.max_pending_auth_per_ip = per_ip;
    })
    .await
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_have_their_own_pending_limit() {
    let server = behind_proxy(1).await;
    let _alice =
        Pending::open_request(forwarded(&server, "/ws", "x-forwarded-for", "203.0.113.7")).await;
    let _bob =
        Pending::open_request(forwarded(&server, "/ws", "x-forwarded-for", "203.0.113.8")).await;
    let again = refusal(forwarded(&server, "/ws", "x-forwarded-for", "203.0.113.7")).await;
    assert_eq!(again.status, 429, "{}", again.body);
}

#[tokio::test]
async fn a_forged_hop_left_of_the_client_does_not_change_its_address() {
    let server = behind_proxy(1).await;
    let _first = Pending::open_request(forwarded(
        &server,
        "/ws",
        "x-forwarded-for",
        "1.1.1.1, 203.0.113.7",
    ))
    .await;
    let forged = refusal(forwarded(
        &server,
        "/ws",
        "x-forwarded-for",
        "2.2.2.2, 203.0.113.7",
    ))
    .await;
    assert_eq!(forged.status, 429, "{}", forged.body);
}

#[tokio::test]
async fn ipv6_clients_share_the_limit_of_their_64() {
    let server = behind_proxy(1).await;
    let _first = Pending::open_request(forwarded(
        &server,
        "/ws",
        "x-forwarded-for",
        "2001:db8:1:2::1",
    ))
    .await;
    let same_64 = refusal(forwarded(
        &server,
        "/ws",
        "x-forwarded-for",
        "2001:db8:1:2:ffff::9",
    ))
    .await;
    assert_eq!(same_64.status, 429, "{}", same_64.body);
    Pending::open_request(forwarded(
        &server,
        "/ws",
        "x-forwarded-for",
        "2001:db8:1:3::1",
    ))
    .await;
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_ignored() {
    let server = TestServer::start_with(|c| c.limits.max_pending_auth_per_ip = 1).await;
    let _first =
        Pending::open_request(forwarded(&server, "/ws", "x-forwarded-for", "203.0.113.7")).await;
    let spoofed = refusal(forwarded(&server, "/ws", "x-forwarded-for", "203.0.113.8")).await;
    assert_eq!(spoofed.status, 429, "{}", spoofed.body);
}

#[tokio::test]
async fn the_forwarded_header_is_read_when_configured() {
    let server = TestServer::start_with(|c| {
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.server.client_address_header = ForwardedHeader::Forwarded;
        c.limits.max_pending_auth_per_ip = 1;
    })
    .await;
    let _first = Pending::open_request(forwarded(
        &server,
        "/ws",
        "forwarded",
        "for=\"[2001:db8::7]:4711\";proto=https",
    ))
    .await;
    let _second =
        Pending::open_request(forwarded(&server, "/ws", "forwarded", "for=203.0.113.8")).await;
}

#[tokio::test]
async fn the_api_lists_each_connection_with_its_client_address() {
    let server = behind_proxy(100).await;
    let token = server.token("alice");
    let request = forwarded(
        &server,
        &format!("/ws?token={token}"),
        "x-forwarded-for",
        "203.0.113.9",
    );
    let _alice = Client::open_request(request).await.unwrap();
    let _bob = server.connect("bob").await;
    let (status, body) = server.api("GET", "/api/connections", None).await;
    assert_eq!(status, 200, "{body}");
    let addr_of = |user: &str| {
        body["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["user"] == user)
            .unwrap_or_else(|| panic!("{user} in {body}"))["addr"]
            .clone()
    };
    assert_eq!(addr_of("alice"), "203.0.113.9");
    // No forwarding header: the proxy's own (here the test's) address.
    assert_eq!(addr_of("bob"), "127.0.0.1");
}
