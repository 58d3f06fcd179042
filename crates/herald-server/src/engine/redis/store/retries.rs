//! Retried requests: a direct message's claim for its sender, and the keys and lifetimes of the
//! retry records a request leaves.

use super::{RedisStore, SCRIPTS};
use crate::engine::redis::replies::{FirstAttempt, claimed};
use crate::engine::store::{IdempotencyKey, NewMessage, StoreError};

/// Retry records: `retry:FINGERPRINT:…`, one hash per request (see `retry_suffix`).
const RETRY: &str = "retry";

impl RedisStore {
    /// Claims a direct message's request for its sender (see `direct_claim.lua`) and, when an
    /// earlier attempt claimed it, takes that attempt's message id and timestamp. Returns
    /// whether it was earlier.
    pub(super) async fn claim_direct(&self, message: &mut NewMessage) -> Result<bool, StoreError> {
        let Some(key) = &message.idempotency else {
            return Ok(false);
        };
        let mut invocation = SCRIPTS.direct_claim.prepare_invoke();
        invocation
            .key(self.keys.user(&message.from, &retry_suffix(key, None)))
            .arg(&message.id)
            .arg(message.ts)
            .arg(window_millis(key));
        let first = claimed(self.run("append", invocation).await?)?;
        if first.id == message.id {
            return Ok(false);
        }
        let FirstAttempt { id, ts } = first;
        message.id = id;
        message.ts = ts;
        Ok(true)
    }
}

/// The key suffix of a request's retry record: the fingerprint (fixed length) first, then for
/// a room the sender (a name holds no space) and a space, then the request id. Kept whole
/// rather than hashed, so one user's records can never collide with another's.
pub(super) fn retry_suffix(key: &IdempotencyKey, user: Option<&str>) -> String {
    let fingerprint = key.fingerprint;
    match user {
        Some(user) => format!("{RETRY}:{fingerprint:032x}:{user} {}", key.request),
        None => format!("{RETRY}:{fingerprint:032x}:{}", key.request),
    }
}

/// A retry record's lifetime: the key's window, at least a millisecond (`PEXPIRE` 0 deletes).
pub(super) fn window_millis(key: &IdempotencyKey) -> u64 {
    u64::try_from(key.window.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
