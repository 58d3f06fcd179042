//! The Redis store's replies read back: what its Lua scripts answer (offsets, positions,
//! stream entries) turned into the store's types, each malformed reply an error naming the
//! operation, never a panic.

use bytes::Bytes;
use herald_protocol::Payload;
use redis::Value;
use serde_json::value::RawValue;

use crate::engine::store::{Epoch, Offset, StoreError, StoredMessage, StreamPosition};

pub(super) fn unexpected(operation: &'static str) -> StoreError {
    StoreError::Backend {
        operation,
        reason: "Redis answered a script with an unexpected reply".into(),
    }
}

pub(super) fn items(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

pub(super) fn fields<const N: usize>(value: Value) -> Option<[Value; N]> {
    items(value)?.try_into().ok()
}

pub(super) fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(number) => u64::try_from(*number).ok(),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

pub(super) fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        Value::VerbatimString { text, .. } => Some(text),
        Value::Nil => Some(String::new()),
        _ => None,
    }
}

/// The message id and timestamp a retried request's first attempt stored.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct FirstAttempt {
    pub id: String,
    pub ts: u64,
}

/// A room append's reply: the position, and for a request recorded earlier, its first
/// attempt (whose position it is).
pub(super) fn room_appended(
    reply: Value,
) -> Result<(StreamPosition, Option<FirstAttempt>), StoreError> {
    let unexpected = || unexpected("append");
    if let Value::Array(_) = reply {
        let [offset, epoch] = fields(reply).ok_or_else(unexpected)?;
        let position = StreamPosition {
            offset: Offset(int(&offset).ok_or_else(unexpected)?),
            epoch: Epoch(text(epoch).ok_or_else(unexpected)?),
        };
        return Ok((position, None));
    }
    let record = text(reply).ok_or_else(unexpected)?;
    let mut parts = record.splitn(4, ' ');
    let (Some(offset), Some(epoch), Some(ts), Some(id)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unexpected());
    };
    let position = StreamPosition {
        offset: Offset(offset.parse().map_err(|_| unexpected())?),
        epoch: Epoch(epoch.to_owned()),
    };
    let first = FirstAttempt {
        id: id.to_owned(),
        ts: ts.parse().map_err(|_| unexpected())?,
    };
    Ok((position, Some(first)))
}

/// A direct message's claim: the message id and timestamp of the request's first attempt.
pub(super) fn claimed(reply: Value) -> Result<FirstAttempt, StoreError> {
    let unexpected = || unexpected("append");
    let record = text(reply).ok_or_else(unexpected)?;
    let (ts, id) = record.split_once(' ').ok_or_else(unexpected)?;
    Ok(FirstAttempt {
        id: id.to_owned(),
        ts: ts.parse().map_err(|_| unexpected())?,
    })
}

/// An inbox append's reply: the offset, or `None` when the inbox is full.
pub(super) fn inbox_offset(reply: Value) -> Result<Option<Offset>, StoreError> {
    match int(&reply).ok_or_else(|| unexpected("append"))? {
        0 => Ok(None),
        offset => Ok(Some(Offset(offset))),
    }
}

/// Stream entries (`[id, [field, value, …]]`) read back as messages; `room` for a room's.
pub(super) fn stored_messages(
    entries: Value,
    room: Option<&str>,
    operation: &'static str,
) -> Result<Vec<StoredMessage>, StoreError> {
    let entries = items(entries).ok_or_else(|| unexpected(operation))?;
    entries
        .into_iter()
        .map(|entry| stored_message(entry, room, operation))
        .collect()
}

pub(super) fn stored_message(
    entry: Value,
    room: Option<&str>,
    operation: &'static str,
) -> Result<StoredMessage, StoreError> {
    let unexpected = || unexpected(operation);
    let [id, values] = fields(entry).ok_or_else(unexpected)?;
    let id = text(id).ok_or_else(unexpected)?;
    let offset = id
        .split_once('-')
        .and_then(|(offset, _)| offset.parse().ok())
        .map(Offset)
        .ok_or_else(unexpected)?;
    let mut message = StoredMessage {
        id: String::new(),
        from: String::new(),
        to: None,
        room: room.map(str::to_owned),
        ts: 0,
        content: Payload::Binary(Bytes::new()),
        offset,
    };
    let mut binary = false;
    let mut content = Vec::new();
    let mut values = items(values).ok_or_else(unexpected)?.into_iter();
    while let (Some(field), Some(value)) = (values.next(), values.next()) {
        let field = text(field).ok_or_else(unexpected)?;
        match field.as_str() {
            "i" => message.id = text(value).ok_or_else(unexpected)?,
            "f" => message.from = text(value).ok_or_else(unexpected)?,
            "o" => {
                let to = text(value).ok_or_else(unexpected)?;
                message.to = Some(serde_json::from_str(&to).unwrap_or_default());
            }
            "t" => message.ts = int(&value).ok_or_else(unexpected)?,
            "b" => binary = int(&value) == Some(1),
            "c" => match value {
                Value::BulkString(bytes) => content = bytes,
                _ => return Err(unexpected()),
            },
            _ => {}
        }
    }
    message.content = if binary {
        Payload::Binary(Bytes::from(content))
    } else {
        String::from_utf8(content)
            .map_err(|e| e.to_string())
            .and_then(|text| RawValue::from_string(text).map_err(|e| e.to_string()))
            .map(Payload::Json)
            .map_err(|reason| StoreError::Backend {
                operation: "decode message",
                reason: format!("stored message at offset {offset} is damaged: {reason}"),
            })?
    };
    Ok(message)
}
