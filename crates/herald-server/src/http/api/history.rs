//! `GET /api/rooms/{room}/history` and `GET /api/conversations/{user}/{other}/history`: one page
//! of stored messages, oldest first, the newest ones older than `before` (see docs/delivery.md).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use herald_protocol::Message;
use http::StatusCode;
use serde::Serialize;

use super::{ApiPath, ApiQuery, engine_failure, valid_name};
use crate::engine::store::Offset;
use crate::http::HttpError;
use crate::node::{HistoryPage, Node};

#[derive(Serialize)]
pub struct Page {
    /// The stream's epoch; offsets compare only within one (absent while the stream is empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<String>,
    messages: Vec<Message>,
    /// Older messages exist: ask again with `before` = the first message's offset.
    more: bool,
}

impl From<HistoryPage> for Page {
    fn from(page: HistoryPage) -> Page {
        Page {
            epoch: (!page.epoch.is_unset()).then_some(page.epoch.0),
            messages: page.messages,
            more: page.more,
        }
    }
}

/// `before` (an offset) and `limit` from the query string.
fn paging(query: &ApiQuery) -> Result<(Option<Offset>, Option<usize>), HttpError> {
    query.only(&["before", "limit"])?;
    let before = match query.get("before") {
        None => None,
        Some(text) => Some(Offset(text.parse().map_err(|_| {
            HttpError::field(
                StatusCode::BAD_REQUEST,
                "before",
                "\"before\" must be a non-negative integer offset",
            )
        })?)),
    };
    let limit = query.get("limit").map(|_| query.limit()).transpose()?;
    Ok((before, limit))
}

pub async fn room(
    State(node): State<Arc<Node>>,
    ApiPath(room): ApiPath<String>,
    query: ApiQuery,
) -> Result<Json<Page>, HttpError> {
    valid_name("room", &room)?;
    let (before, limit) = paging(&query)?;
    let page = node
        .room_history(&room, before, limit)
        .await
        .map_err(engine_failure)?;
    Ok(Json(page.into()))
}

pub async fn conversation(
    State(node): State<Arc<Node>>,
    ApiPath((user, other)): ApiPath<(String, String)>,
    query: ApiQuery,
) -> Result<Json<Page>, HttpError> {
    valid_name("user", &user)?;
    valid_name("other", &other)?;
    let (before, limit) = paging(&query)?;
    let page = node
        .conversation_history(&user, &other, before, limit)
        .await
        .map_err(engine_failure)?;
    Ok(Json(page.into()))
}
