//! Reads of a room's or a conversation's stream: the entries after an offset (catch-up) and
//! the pages before one (history).

use super::{MAX_READ, RedisStore, SCRIPTS};
use crate::engine::redis::replies::{fields, int, stored_messages, text, unexpected};
use crate::engine::store::{
    Epoch, Offset, Page, StoreError, StreamBounds, StreamPosition, StreamRead,
};

impl RedisStore {
    pub(super) async fn read_after(
        &self,
        operation: &'static str,
        meta: String,
        stream: String,
        after: Offset,
        limit: usize,
        room: &str,
    ) -> Result<StreamRead, StoreError> {
        let mut invocation = SCRIPTS.read_after.prepare_invoke();
        invocation
            .key(meta)
            .key(stream)
            .arg(after.0)
            .arg(limit.min(MAX_READ));
        let reply = self.run(operation, invocation).await?;
        let unexpected = || unexpected(operation);
        let [epoch, last, first, entries] = fields(reply).ok_or_else(unexpected)?;
        let last = Offset(int(&last).ok_or_else(unexpected)?);
        let first = match int(&first).ok_or_else(unexpected)? {
            0 => last.next(),
            first => Offset(first),
        };
        Ok(StreamRead {
            bounds: StreamBounds {
                top: StreamPosition {
                    offset: last,
                    epoch: Epoch(text(epoch).ok_or_else(unexpected)?),
                },
                first,
            },
            messages: stored_messages(entries, Some(room), operation)?,
        })
    }

    pub(super) async fn read_before(
        &self,
        operation: &'static str,
        meta: String,
        stream: String,
        before: Option<Offset>,
        limit: usize,
        room: Option<&str>,
    ) -> Result<Page, StoreError> {
        // The script reads from the newest when told 0; an explicit 0 has nothing below it.
        let before = match before {
            None => 0,
            Some(Offset(0)) => 1,
            Some(offset) => offset.0,
        };
        let mut invocation = SCRIPTS.read_before.prepare_invoke();
        invocation
            .key(meta)
            .key(stream)
            .arg(before)
            .arg(limit.min(MAX_READ));
        let reply = self.run(operation, invocation).await?;
        let [epoch, entries] = fields(reply).ok_or_else(|| unexpected(operation))?;
        let mut messages = stored_messages(entries, room, operation)?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        messages.reverse();
        Ok(Page {
            epoch: Epoch(text(epoch).ok_or_else(|| unexpected(operation))?),
            messages,
            more,
        })
    }
}
