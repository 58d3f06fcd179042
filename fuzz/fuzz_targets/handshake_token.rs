//! Token extraction at the handshake: the input is an HTTP request head as a client sends it
//! (`GET /ws?token=… HTTP/1.1`, then headers). It goes through what the server does with it:
//! the head parsed with `httparse` (hyper's parser), the query read into the handshake
//! parameters (`serde_urlencoded`, as axum's `Query`), the token found by
//! `auth::token_from_request` (query, then `Authorization: Bearer`, then the
//! `herald.bearer.` subprotocol) and verified by the `Authenticator`.
//!
//! Random bytes never carry a valid signature, so a token without a dot is also read as a JSON
//! claims object, signed with the server's secret and verified: that reaches the claim checks
//! (`sub`, `exp`, `rooms`, `admin`) behind the signature.
#![no_main]

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use herald_protocol::names::check_name;
use herald_server::auth::{self, AuthError, Authenticator};
use herald_server::config::AuthConfig;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use jsonwebtoken::{EncodingKey, Header};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-0123456789abcdef";
/// The most headers the server reads (hyper's default).
const MAX_HEADERS: usize = 100;
/// The authenticator's leeway on `exp`, in seconds.
const LEEWAY_S: u64 = 5;

/// The query parameters of the handshake (`http/upgrade.rs` `HandshakeParams`).
#[derive(serde::Deserialize)]
struct HandshakeParams {
    token: Option<String>,
    #[allow(dead_code)]
    user: Option<String>,
    #[allow(dead_code)]
    rooms: Option<String>,
}

static AUTH: LazyLock<Authenticator> = LazyLock::new(|| {
    let config = AuthConfig {
        secret: Some(SECRET.to_owned()),
        ..AuthConfig::default()
    };
    Authenticator::from_config(&config, None).expect("an HS256 secret is a valid setup")
});
static KEY: LazyLock<EncodingKey> = LazyLock::new(|| EncodingKey::from_secret(SECRET.as_bytes()));

fuzz_target!(|data: &[u8]| {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut parsed);
    // hyper answers a head it cannot parse with 400: nothing reaches the handshake code.
    if request.parse(data).is_err() {
        return;
    }
    let Some(uri) = request.path.and_then(|path| path.parse::<Uri>().ok()) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for header in request.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return;
        };
        headers.append(name, value);
    }
    // axum's `Query` refuses a query that does not deserialize (400).
    let Ok(params) = serde_urlencoded::from_str::<HandshakeParams>(uri.query().unwrap_or_default())
    else {
        return;
    };

    for offered in auth::offered_subprotocols(&headers) {
        assert!(!offered.starts_with(char::is_whitespace) && !offered.ends_with(char::is_whitespace));
    }
    let Some(token) = auth::token_from_request(params.token.as_deref(), &headers) else {
        return;
    };
    check_identity(AUTH.verify(token), None);

    if !token.contains('.')
        && let Ok(claims) = serde_json::from_str::<serde_json::Value>(token)
        && claims.is_object()
    {
        let signed = jsonwebtoken::encode(&Header::default(), &claims, &KEY)
            .expect("HS256 signs any JSON object");
        check_identity(AUTH.verify(&signed), Some(&claims));
    }
});

/// What a verified token promises, and what a well-formed, unexpired, properly signed one gets.
fn check_identity(verified: Result<auth::Identity, AuthError>, claims: Option<&serde_json::Value>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match &verified {
        Ok(identity) => {
            assert_eq!(check_name(&identity.user), Ok(()));
            let exp = identity.expires_at.expect("a token identity expires");
            assert!(exp.saturating_add(LEEWAY_S) >= now, "accepted a token expired at {exp}");
        }
        Err(AuthError::Missing) => panic!("a token was found but reported missing"),
        Err(_) => {}
    }
    let Some(claims) = claims else { return };
    let sub_ok = claims["sub"].as_str().is_some_and(|sub| check_name(sub).is_ok());
    let exp_ok = claims["exp"].as_u64().is_some_and(|exp| exp > now + 60);
    let rooms_ok = claims.get("rooms").is_none_or(|rooms| {
        rooms.is_null()
            || rooms
                .as_array()
                .is_some_and(|rooms| rooms.iter().all(serde_json::Value::is_string))
    });
    let admin_ok = claims.get("admin").is_none_or(serde_json::Value::is_boolean);
    if sub_ok && exp_ok && rooms_ok && admin_ok {
        assert!(verified.is_ok(), "a valid signed token was refused: {claims} → {verified:?}");
    }
}
