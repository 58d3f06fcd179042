//! `GET /ws` and `GET /ws/{room}`: the WebSocket handshake.
//!
//! Checks run before the upgrade, so a refused client gets a plain HTTP status with a JSON
//! reason and no WebSocket: Origin (403), token (401), rooms asked for at connect (400/403),
//! the per-user connection limit (429), the pending-authentication limits (503 in total, 429
//! per IP) for a handshake without a token when `auth.message_auth` is on. The connection itself is served in a task tracked by
//! the node, so shutdown waits for its Close frame.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Extension;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;

use super::HttpError;
use super::client_addr;
use crate::auth::{self, AuthError, Identity};
use crate::connection::pending::{PendingAuth, PendingLimit};
use crate::connection::{self, Admission};
use crate::node::Node;
use crate::transport;
use herald_protocol::names::check_name;

#[derive(Debug, Default, Deserialize)]
pub struct HandshakeParams {
    token: Option<String>,
    /// Development only (`auth.anonymous`): the user name.
    user: Option<String>,
    /// Rooms to join at connect, comma-separated.
    rooms: Option<String>,
    /// A stable id of the client's device, with its own inbox mark.
    device: Option<String>,
}

pub async fn websocket(
    State(node): State<Arc<Node>>,
    Extension(pending): Extension<Arc<PendingAuth>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<HandshakeParams>,
    request: Request,
) -> Response {
    accept(node, &pending, peer, params, None, request).unwrap_or_else(IntoResponse::into_response)
}

pub async fn websocket_in_room(
    State(node): State<Arc<Node>>,
    Extension(pending): Extension<Arc<PendingAuth>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(room): Path<String>,
    Query(params): Query<HandshakeParams>,
    request: Request,
) -> Response {
    accept(node, &pending, peer, params, Some(room), request)
        .unwrap_or_else(IntoResponse::into_response)
}

fn accept(
    node: Arc<Node>,
    pending: &Arc<PendingAuth>,
    peer: SocketAddr,
    params: HandshakeParams,
    path_room: Option<String>,
    mut request: Request,
) -> Result<Response, HttpError> {
    let headers = request.headers();
    check_origin(headers, &node.config().limits.allowed_origins)?;
    let server = &node.config().server;
    let client = client_addr::client_ip(
        peer.ip(),
        headers,
        &server.trusted_proxies,
        server.client_address_header,
    );
    let admission = admit(&node, pending, client, &params, headers)?;
    let rooms = rooms_at_connect(params.rooms.as_deref(), path_room)?;
    let device = device_at_connect(params.device.as_deref())?;
    if let Admission::Authenticated(identity) = &admission {
        check_rooms_claim(identity, &rooms)?;
        let limit = node.config().limits.max_connections_per_user;
        if node.hub().user_connection_count(&identity.user) >= limit {
            return Err(HttpError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "this user has reached limits.max_connections_per_user",
            ));
        }
    }
    let offers_subprotocol = auth::offered_subprotocols(headers).any(|p| p == auth::SUBPROTOCOL);

    let options = transport::server_options(
        node.config().limits.max_message_bytes,
        &node.config().compression,
    );
    let (response, upgrade) = transport::upgrade(&mut request, options).map_err(|error| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("not a WebSocket upgrade: {error}"),
        )
    })?;
    let mut response = response.map(axum::body::Body::new);
    if offers_subprotocol {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(auth::SUBPROTOCOL),
        );
    }

    let handshake_timeout = node.config().server.handshake_timeout;
    let tasks = node.tasks().clone();
    // This task lives as long as the connection, and its future keeps room for everything it
    // captures (for its whole life, even once moved out) or holds across an await. So it
    // captures one box, freed once upgraded, holding the upgrade future and what the
    // connection starts with; and the WebSocket leaves the `match` before the long await.
    let start = Box::new((
        Box::pin(upgrade),
        handshake_timeout,
        node,
        admission,
        rooms,
        client,
        device,
    ));
    tasks.spawn(async move {
        let (upgrade, handshake_timeout, node, admission, rooms, client, device) = *start;
        let ws = match tokio::time::timeout(handshake_timeout, upgrade).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(error)) => return tracing::debug!(%error, "upgrade failed"),
            Err(_) => return tracing::debug!("upgrade timed out"),
        };
        connection::serve(ws, node, admission, rooms, client, device).await
    });
    Ok(response)
}

/// Decides how the connection gets in: with a verified token, as an anonymous development user,
/// or pending its `auth` message (within the pending limits); otherwise 401.
fn admit(
    node: &Node,
    pending: &Arc<PendingAuth>,
    client: IpAddr,
    params: &HandshakeParams,
    headers: &HeaderMap,
) -> Result<Admission, HttpError> {
    let unauthorized = |error: AuthError| {
        metrics::counter!("herald_handshakes_refused_total", "reason" => "auth").increment(1);
        HttpError::new(StatusCode::UNAUTHORIZED, error.to_string())
    };
    if let Some(token) = auth::token_from_request(params.token.as_deref(), headers) {
        return node
            .auth()
            .verify(token)
            .map(Admission::Authenticated)
            .map_err(unauthorized);
    }
    if let (Some(user), true) = (&params.user, node.auth().anonymous_allowed()) {
        return node
            .auth()
            .anonymous(user)
            .map(Admission::Authenticated)
            .map_err(unauthorized);
    }
    if !node.config().auth.message_auth {
        return Err(unauthorized(AuthError::Missing));
    }
    let limits = &node.config().limits;
    pending
        .admit(
            client_addr::limit_key(client),
            limits.max_pending_auth,
            limits.max_pending_auth_per_ip,
        )
        .map(Admission::Pending)
        .map_err(|limit| {
            metrics::counter!("herald_handshakes_refused_total", "reason" => "pending_limit")
                .increment(1);
            tracing::warn!(%client, %limit, "pending authentication limit reached");
            let status = match limit {
                PendingLimit::Total => StatusCode::SERVICE_UNAVAILABLE,
                PendingLimit::PerIp => StatusCode::TOO_MANY_REQUESTS,
            };
            HttpError::new(status, limit.to_string())
        })
}

/// Browsers always send `Origin`; other clients usually do not, and are not subject to
/// cross-site attacks. A browser page may connect from the server's own origin or from one
/// listed in `limits.allowed_origins` (`*` allows any).
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), HttpError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or_default();
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        return Ok(());
    }
    metrics::counter!("herald_handshakes_refused_total", "reason" => "origin").increment(1);
    Err(HttpError::new(
        StatusCode::FORBIDDEN,
        format!("origin {origin:?} is not allowed (see limits.allowed_origins)"),
    ))
}

/// `?device=`, checked like a name (it is a key in the store and appears in logs).
fn device_at_connect(device: Option<&str>) -> Result<Option<Arc<str>>, HttpError> {
    let Some(device) = device else {
        return Ok(None);
    };
    check_name(device).map_err(|reason| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("device {device:?} {reason}"),
        )
    })?;
    Ok(Some(device.into()))
}

fn rooms_at_connect(
    query_rooms: Option<&str>,
    path_room: Option<String>,
) -> Result<Vec<String>, HttpError> {
    let mut rooms: Vec<String> = path_room.into_iter().collect();
    rooms.extend(
        query_rooms
            .unwrap_or_default()
            .split(',')
            .filter(|room| !room.is_empty())
            .map(str::to_owned),
    );
    for room in &rooms {
        check_name(room).map_err(|why| {
            HttpError::new(StatusCode::BAD_REQUEST, format!("room {room:?} {why}"))
        })?;
    }
    rooms.dedup();
    Ok(rooms)
}

/// A token's `rooms` claim is checked at the handshake when the token came with it; a pending
/// connection's rooms are checked when it authenticates (a refused room is an error frame).
fn check_rooms_claim(identity: &Identity, rooms: &[String]) -> Result<(), HttpError> {
    match rooms.iter().find(|room| !identity.may_use_room(room)) {
        Some(room) => Err(HttpError::new(
            StatusCode::FORBIDDEN,
            format!("the token does not allow room {room:?}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: &str, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ORIGIN, origin.parse().unwrap());
        headers.insert(header::HOST, host.parse().unwrap());
        headers
    }

    #[test]
    fn same_origin_and_listed_origins_pass_others_are_refused() {
        assert!(
            check_origin(
                &headers("http://chat.example:8080", "chat.example:8080"),
                &[]
            )
            .is_ok()
        );
        assert!(check_origin(&headers("https://evil.example", "chat.example"), &[]).is_err());
        let allowed = vec!["https://app.example".to_owned()];
        assert!(check_origin(&headers("https://app.example", "chat.example"), &allowed).is_ok());
        assert!(check_origin(&headers("https://evil.example", "x"), &["*".to_owned()]).is_ok());
        assert!(check_origin(&HeaderMap::new(), &[]).is_ok());
    }
}
