//! Token authentication: JWT verification at the handshake and minting for `herald token`.
//!
//! Tokens are HS256 with a shared secret, or RS256/ES256 verified with a PEM public key. Only the
//! configured algorithm is accepted, so `alg: none` and algorithm-confusion tokens fail. `sub`
//! is the user id; `exp` is required; `nbf`, when present, is checked; `aud` and `iss` are
//! required and checked when `auth.audience` and `auth.issuer` are set, so tokens an identity
//! provider issued for other applications are refused.
//!
//! What a token allows:
//! - `rooms` (optional) limits the rooms: `join`, `publish`, `members` and room `history` of
//!   any other room are refused. It says nothing about users.
//! - `direct` (optional, default `true`): `false` refuses everything about other users by
//!   name: `send` (direct messages), `presence` and conversation `history`. Direct messages sent
//!   *to* the user still arrive. A token limited to a few rooms usually wants `direct: false`.
//! - `admin: true` allows `broadcast`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use herald_protocol::names::check_name;

/// The subprotocol a browser offers (with the token entry) and the server selects.
pub const SUBPROTOCOL: &str = "herald";
/// Prefix of the `Sec-WebSocket-Protocol` entry that carries a token.
pub const SUBPROTOCOL_TOKEN_PREFIX: &str = "herald.bearer.";

/// The claims Herald reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub direct: bool,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// The latest expiry a token can have: the last second of year 9999. Later `exp` values mean
/// "never" and are read as this, so that no conversion (to milliseconds, to the writer's packed
/// deadline) can overflow and wrap into the past.
pub const MAX_EXPIRY_UNIX_SECS: u64 = 253_402_300_799;

/// Who a connection is and what it may do, fixed at authentication.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: Arc<str>,
    /// `None`: any room. `Some`: only these.
    pub rooms: Option<Arc<HashSet<String>>>,
    pub admin: bool,
    /// Whether the user may address other users by name (`send`, `presence`, conversation
    /// history).
    pub direct: bool,
    /// Unix seconds when the token expires, at most [`MAX_EXPIRY_UNIX_SECS`]; `None` for
    /// anonymous development users.
    pub expires_at: Option<u64>,
}

impl Identity {
    pub fn may_use_room(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|rooms| rooms.contains(room))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "no token: pass ?token=, an Authorization: Bearer header, or a herald.bearer.<token> subprotocol"
    )]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("invalid user name: {0}")]
    BadUser(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("auth.public_key: cannot read {path}: {source}")]
    ReadKey {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.public_key: {path} is not a PEM {algorithm:?} public key: {source}")]
    ParseKey {
        path: String,
        algorithm: Algorithm,
        source: jsonwebtoken::errors::Error,
    },
    #[error("auth.secret is needed to mint tokens (set HERALD_AUTH_SECRET)")]
    NoSecret,
}

/// Verifies tokens (and mints them when a shared secret is configured).
pub struct Authenticator {
    decoding: DecodingKey,
    validation: Validation,
    encoding: Option<EncodingKey>,
    anonymous: bool,
}

impl Authenticator {
    /// Builds from config. `generated_secret` is used when neither a secret nor a key is set.
    pub fn from_config(
        config: &AuthConfig,
        generated_secret: Option<&str>,
    ) -> Result<Self, AuthSetupError> {
        let (algorithm, decoding, encoding) = match (&config.public_key, &config.secret) {
            (Some(path), _) => {
                let algorithm = match config.algorithm.as_deref() {
                    Some("ES256") => Algorithm::ES256,
                    _ => Algorithm::RS256,
                };
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| AuthSetupError::ReadKey {
                    path: shown.clone(),
                    source,
                })?;
                let key = match algorithm {
                    Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                    _ => DecodingKey::from_rsa_pem(&pem),
                }
                .map_err(|source| AuthSetupError::ParseKey {
                    path: shown,
                    algorithm,
                    source,
                })?;
                (algorithm, key, None)
            }
            (None, secret) => {
                let secret = secret
                    .as_deref()
                    .or(generated_secret)
                    .ok_or(AuthSetupError::NoSecret)?;
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                    Some(EncodingKey::from_secret(secret.as_bytes())),
                )
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = 5;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Identity providers put an `aud` in their tokens; without a configured audience
            // there is nothing to compare it with.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Authenticator {
            decoding,
            validation,
            encoding,
            anonymous: config.anonymous,
        })
    }

    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let claims = data.claims;
        check_name(&claims.sub).map_err(AuthError::BadUser)?;
        Ok(Identity {
            user: claims.sub.into(),
            rooms: claims
                .rooms
                .map(|rooms| Arc::new(rooms.into_iter().collect())),
            admin: claims.admin,
            direct: claims.direct,
            expires_at: Some(claims.exp.min(MAX_EXPIRY_UNIX_SECS)),
        })
    }

    /// A development identity from `?user=NAME`, when `auth.anonymous` is on.
    pub fn anonymous(&self, user: &str) -> Result<Identity, AuthError> {
        check_name(user).map_err(AuthError::BadUser)?;
        Ok(Identity {
            user: user.into(),
            rooms: None,
            admin: false,
            direct: true,
            expires_at: None,
        })
    }

    pub fn mint(
        &self,
        user: &str,
        admin: bool,
        rooms: Option<Vec<String>>,
        ttl: Duration,
    ) -> Result<String, AuthSetupError> {
        let key = self.encoding.as_ref().ok_or(AuthSetupError::NoSecret)?;
        let claims = Claims {
            sub: user.to_owned(),
            exp: unix_now() + ttl.as_secs(),
            rooms,
            admin,
            direct: true,
        };
        Ok(
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
                .expect("HS256 encoding of plain claims cannot fail"),
        )
    }
}

/// Where the handshake carried its token, in order of preference.
pub fn token_from_request<'a>(
    query_token: Option<&'a str>,
    headers: &'a HeaderMap,
) -> Option<&'a str> {
    if let Some(token) = query_token {
        return Some(token);
    }
    if let Some(value) = headers.get(http::header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
        && let Some(token) = value.strip_prefix("Bearer ")
    {
        return Some(token.trim());
    }
    offered_subprotocols(headers).find_map(|entry| entry.strip_prefix(SUBPROTOCOL_TOKEN_PREFIX))
}

/// The entries of `Sec-WebSocket-Protocol`.
pub fn offered_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs256() -> Authenticator {
        let config = AuthConfig {
            secret: Some("0123456789abcdef-test".into()),
            ..AuthConfig::default()
        };
        Authenticator::from_config(&config, None).unwrap()
    }

    #[test]
    fn minted_tokens_verify_with_their_claims() {
        let auth = hs256();
        let token = auth
            .mint(
                "alice",
                true,
                Some(vec!["lobby".into()]),
                Duration::from_secs(60),
            )
            .unwrap();
        let identity = auth.verify(&token).unwrap();
        assert_eq!(&*identity.user, "alice");
        assert!(identity.admin);
        assert!(identity.may_use_room("lobby"));
        assert!(!identity.may_use_room("secret"));
    }

    #[test]
    fn alg_none_and_foreign_signatures_are_refused() {
        let auth = hs256();
        // {"alg":"none","typ":"JWT"} . {"sub":"mallory","exp":9999999999} . (no signature)
        let none =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(matches!(auth.verify(none), Err(AuthError::Invalid(_))));

        let other = Authenticator::from_config(
            &AuthConfig {
                secret: Some("another-secret-of-16+".into()),
                ..AuthConfig::default()
            },
            None,
        )
        .unwrap();
        let forged = other
            .mint("alice", true, None, Duration::from_secs(60))
            .unwrap();
        assert!(matches!(auth.verify(&forged), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn audience_is_checked_only_when_configured() {
        let claims = serde_json::json!({"sub": "a", "exp": unix_now() + 60, "aud": "chat"});
        let key = EncodingKey::from_secret(b"0123456789abcdef-test");
        let token = jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap();
        assert!(
            hs256().verify(&token).is_ok(),
            "an aud is accepted when none is configured"
        );

        let config = |audience: &str| AuthConfig {
            secret: Some("0123456789abcdef-test".into()),
            audience: Some(audience.into()),
            ..AuthConfig::default()
        };
        let chat = Authenticator::from_config(&config("chat"), None).unwrap();
        assert!(chat.verify(&token).is_ok());
        let other = Authenticator::from_config(&config("billing"), None).unwrap();
        assert!(other.verify(&token).is_err());
    }

    fn signed(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret(b"0123456789abcdef-test");
        jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap()
    }

    #[test]
    fn issuer_is_required_and_checked_when_configured() {
        let config = AuthConfig {
            secret: Some("0123456789abcdef-test".into()),
            issuer: Some("https://id.example".into()),
            ..AuthConfig::default()
        };
        let auth = Authenticator::from_config(&config, None).unwrap();
        let exp = unix_now() + 60;
        let ours = signed(serde_json::json!({"sub": "a", "exp": exp, "iss": "https://id.example"}));
        let theirs = signed(serde_json::json!({"sub": "a", "exp": exp, "iss": "https://other"}));
        let none = signed(serde_json::json!({"sub": "a", "exp": exp}));
        assert!(auth.verify(&ours).is_ok());
        assert!(auth.verify(&theirs).is_err());
        assert!(auth.verify(&none).is_err());
    }

    #[test]
    fn a_token_before_its_nbf_is_refused() {
        let now = unix_now();
        let later = signed(serde_json::json!({"sub": "a", "exp": now + 600, "nbf": now + 300}));
        assert_eq!(hs256().verify(&later).unwrap_err(), AuthError::NotYetValid);
        let valid = signed(serde_json::json!({"sub": "a", "exp": now + 600, "nbf": now - 1}));
        assert!(hs256().verify(&valid).is_ok());
    }

    #[test]
    fn a_far_future_exp_is_read_as_the_latest_expiry() {
        let token = signed(serde_json::json!({"sub": "a", "exp": u64::MAX}));
        let identity = hs256().verify(&token).unwrap();
        assert_eq!(identity.expires_at, Some(MAX_EXPIRY_UNIX_SECS));
        assert!(identity.direct);
        let limited =
            signed(serde_json::json!({"sub": "a", "exp": unix_now() + 60, "direct": false}));
        assert!(!hs256().verify(&limited).unwrap().direct);
    }

    #[test]
    fn tokens_are_found_in_query_header_and_subprotocol() {
        let mut headers = HeaderMap::new();
        assert_eq!(token_from_request(Some("q"), &headers), Some("q"));
        headers.insert("authorization", "Bearer h".parse().unwrap());
        assert_eq!(token_from_request(None, &headers), Some("h"));
        let mut headers = HeaderMap::new();
        headers.insert(
            "sec-websocket-protocol",
            "herald, herald.bearer.p".parse().unwrap(),
        );
        assert_eq!(token_from_request(None, &headers), Some("p"));
    }
}
