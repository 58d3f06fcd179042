//! Tokens for every server: HS256 JWTs signed with the secret the server verifies with
//! (`auth.secret` for Herald, `HERALD_AUTH_SECRET` for the peers), with `sub` and `exp`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

pub struct TokenMinter {
    key: EncodingKey,
    header: Header,
    exp: u64,
}

impl TokenMinter {
    /// Tokens valid for `ttl` from now.
    pub fn new(secret: &str, ttl: Duration) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        TokenMinter {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::default(),
            exp: (now + ttl).as_secs(),
        }
    }

    pub fn mint(&self, user: &str) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(
            &self.header,
            &Claims {
                sub: user,
                exp: self.exp,
            },
            &self.key,
        )
    }
}
