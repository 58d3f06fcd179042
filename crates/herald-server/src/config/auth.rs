//! `[auth]`: how clients prove who they are (tokens, the development modes, authentication
//! after the handshake) and the checks that keep the development modes off public addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, duration, positive};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret. When neither this nor `public_key` is set, `serve` generates one.
    pub secret: Option<String>,
    /// PEM public key file for RS256 or ES256 tokens.
    pub public_key: Option<PathBuf>,
    /// `HS256`, `RS256` or `ES256`; defaults to HS256 with a secret, RS256 with a public key.
    pub algorithm: Option<String>,
    /// When set, tokens must carry this `aud`; when unset, `aud` is not checked.
    pub audience: Option<String>,
    /// When set, tokens must carry this `iss`; when unset, `iss` is not checked.
    pub issuer: Option<String>,
    /// Development only: accept `?user=NAME` without a token.
    pub anonymous: bool,
    /// Development only: `POST /dev/token {"user": NAME}` hands out tokens to anyone, for the
    /// chat page's name sign-in. Needs `auth.secret`.
    pub dev_login: bool,
    /// Let `anonymous` or `dev_login` run on an address other than loopback. Anyone who can
    /// reach the port can then act as any user.
    pub allow_insecure_public: bool,
    /// Accept a handshake without a token in a pending state; the first message must be
    /// `{"type":"auth","token":…}`.
    pub message_auth: bool,
    /// How long a pending connection has to authenticate.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Invalid `auth` messages before a pending connection is closed (4102); as many frames
    /// of any other kind close it too (1008).
    pub max_attempts: u32,
    /// How long before the token's `exp` the server asks the client to refresh it.
    #[serde(with = "duration")]
    pub refresh_notice: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret: None,
            public_key: None,
            algorithm: None,
            audience: None,
            issuer: None,
            anonymous: false,
            dev_login: false,
            allow_insecure_public: false,
            message_auth: true,
            timeout: Duration::from_secs(5),
            max_attempts: 3,
            refresh_notice: Duration::from_secs(30),
        }
    }
}

impl AuthConfig {
    /// `listen` is `server.listen`: the development modes run only on loopback.
    pub(super) fn validate(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        positive("auth.max_attempts", self.max_attempts as usize)?;
        if self.timeout.is_zero() {
            return Err(ConfigError::Key {
                key: "auth.timeout",
                reason: "must be greater than zero".into(),
            });
        }
        if let Some(algorithm) = &self.algorithm {
            let with_key = self.public_key.is_some();
            let reason = match (algorithm.as_str(), with_key) {
                ("HS256", false) | ("RS256" | "ES256", true) => None,
                ("HS256", true) => Some("HS256 needs auth.secret, not auth.public_key".to_owned()),
                ("RS256" | "ES256", false) => Some(format!("{algorithm} needs auth.public_key")),
                _ => Some(format!("{algorithm:?} is not one of HS256, RS256, ES256")),
            };
            if let Some(reason) = reason {
                return Err(ConfigError::Key {
                    key: "auth.algorithm",
                    reason,
                });
            }
        }
        let development = [
            ("auth.anonymous", self.anonymous),
            ("auth.dev_login", self.dev_login),
        ];
        if let Some((key, _)) = development.iter().find(|(_, on)| *on)
            && !listen.ip().is_loopback()
            && !self.allow_insecure_public
        {
            return Err(ConfigError::Key {
                key,
                reason: format!(
                    "lets anyone act as any user, so it only runs on a loopback server.listen \
                     (not {}) unless auth.allow_insecure_public is set",
                    listen
                ),
            });
        }
        if self.dev_login && self.public_key.is_some() {
            return Err(ConfigError::Key {
                key: "auth.dev_login",
                reason: "mints HS256 tokens, so it needs auth.secret rather than auth.public_key"
                    .into(),
            });
        }
        if let Some(secret) = &self.secret
            && secret.len() < 16
        {
            return Err(ConfigError::Key {
                key: "auth.secret",
                reason: "must be at least 16 bytes long".into(),
            });
        }
        Ok(())
    }
}
