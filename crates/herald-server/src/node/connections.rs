//! Connection statistics across the deployment. Only the node holding a connection knows its
//! traffic, so the server API's connection listings are a survey over the broker: every node
//! answers with its own matching connections, and the answers are merged.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Node;
use crate::delivery::ConnId;
use crate::engine::EngineError;
use crate::hub::ConnHandle;

/// Which connections a listing asks for; also the survey's question.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ask", rename = "connections")]
pub struct ConnectionQuery {
    /// Only this user's connections.
    pub user: Option<String>,
    /// Only this connection.
    pub id: Option<ConnId>,
    /// At most this many, the lowest ids first.
    pub limit: usize,
}

/// Traffic statistics of one connection. Counters cover data frames only; bytes are payload
/// bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionStats {
    pub id: ConnId,
    pub user: String,
    pub node: String,
    /// The client's IP address (behind trusted proxies, the one they name).
    pub addr: String,
    /// Unix milliseconds.
    pub connected_at: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
    pub rooms: Vec<String>,
}

/// One node's answer.
#[derive(Debug, Serialize, Deserialize)]
struct NodeConnections {
    node: String,
    connections: Vec<ConnectionStats>,
    /// More matched than the query's limit.
    truncated: bool,
}

/// The merged answers of every node that answered.
#[derive(Debug)]
pub struct Connections {
    /// Sorted by id, at most the query's limit.
    pub connections: Vec<ConnectionStats>,
    /// More matched than the limit.
    pub truncated: bool,
    /// The nodes that answered, sorted.
    pub nodes: Vec<String>,
    /// Nodes that were asked but did not answer in time: their connections are missing.
    pub unanswered: usize,
}

impl Node {
    /// The matching connections on every node.
    pub async fn connections(&self, query: &ConnectionQuery) -> Result<Connections, EngineError> {
        let question = serde_json::to_vec(query).expect("a query serializes");
        let answers = self.broker.survey(Bytes::from(question)).await?;
        let mut merged = Connections {
            connections: Vec::new(),
            truncated: false,
            nodes: Vec::new(),
            unanswered: answers.unanswered,
        };
        for answer in answers.answers {
            match serde_json::from_slice::<NodeConnections>(&answer) {
                Ok(answer) => {
                    merged.connections.extend(answer.connections);
                    merged.truncated |= answer.truncated;
                    merged.nodes.push(answer.node);
                }
                Err(error) => {
                    tracing::warn!(%error, "a node's answer about its connections is unreadable");
                    merged.unanswered += 1;
                }
            }
        }
        merged.nodes.sort_unstable();
        merged.connections.sort_unstable_by_key(|stats| stats.id);
        if merged.connections.len() > query.limit {
            merged.connections.truncate(query.limit);
            merged.truncated = true;
        }
        Ok(merged)
    }

    /// This node's answer to a [`ConnectionQuery`]; `None` for another question.
    pub(super) fn answer_connections(&self, question: &[u8]) -> Option<Bytes> {
        let query: ConnectionQuery = serde_json::from_slice(question).ok()?;
        let hub = self.hub();
        let mut handles = match (&query.id, &query.user) {
            (Some(id), user) => hub
                .connection(*id)
                .into_iter()
                .filter(|handle| user.as_deref().is_none_or(|user| **handle.user() == *user))
                .collect(),
            (None, Some(user)) => hub.user_connections(user),
            (None, None) => hub.snapshot(),
        };
        handles.sort_unstable_by_key(ConnHandle::id);
        let truncated = handles.len() > query.limit;
        handles.truncate(query.limit);
        // One pass over every room only when listing several connections.
        let mut rooms = if handles.len() > 1 {
            hub.rooms_by_connection()
        } else {
            handles
                .iter()
                .map(|handle| (handle.id(), hub.rooms_of(handle.id())))
                .collect()
        };
        let connections = handles
            .iter()
            .map(|handle| self.stats(handle, rooms.remove(&handle.id()).unwrap_or_default()))
            .collect();
        let answer = NodeConnections {
            node: self.id().to_string(),
            connections,
            truncated,
        };
        Some(Bytes::from(
            serde_json::to_vec(&answer).expect("an answer serializes"),
        ))
    }

    fn stats(&self, handle: &ConnHandle, rooms: Vec<Arc<str>>) -> ConnectionStats {
        let snapshot = handle.stats().snapshot();
        ConnectionStats {
            id: handle.id(),
            user: handle.user().to_string(),
            node: self.id().to_string(),
            addr: handle.addr().to_string(),
            connected_at: snapshot
                .connected_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64),
            messages_in: snapshot.messages_in,
            bytes_in: snapshot.bytes_in,
            messages_out: snapshot.messages_out,
            bytes_out: snapshot.bytes_out,
            rooms: rooms.iter().map(|room| room.to_string()).collect(),
        }
    }
}
