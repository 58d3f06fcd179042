//! The HTTP side of the single port: the WebSocket upgrade, the server API under `/api/`,
//! `/metrics`, `/health`, `/ready`, the JavaScript client at `/herald.js`, in development
//! `/dev/token`, and static files at `/`. `app(node)` builds the router without a socket, so
//! tests can drive it directly.
//!
//! Every endpoint but the upgrade (specified in `docs/protocol.md`), the development ones and
//! the files is listed once in [`ENDPOINTS`], and the router is built from that table:
//! `docs/openapi.yaml` documents exactly these, which `tests/openapi.rs` checks both ways.

pub mod api;
pub mod client_addr;
mod dev;
mod error;
mod health;
mod host;
mod metrics;
mod static_files;
mod upgrade;

use std::sync::Arc;

use axum::routing::{MethodFilter, MethodRouter, any, get, on, post};
use axum::{Extension, Router};
use http::Method;

pub use error::HttpError;

use crate::connection::pending::PendingAuth;
use crate::node::Node;

/// One HTTP endpoint: its method, its path (axum syntax, which OpenAPI shares: `{room}`), and
/// whether it needs an API key.
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub needs_api_key: bool,
    route: fn(MethodFilter) -> MethodRouter<Arc<Node>>,
}

impl Endpoint {
    const fn open(
        method: Method,
        path: &'static str,
        route: fn(MethodFilter) -> MethodRouter<Arc<Node>>,
    ) -> Endpoint {
        Endpoint {
            method,
            path,
            needs_api_key: false,
            route,
        }
    }

    const fn api(
        method: Method,
        path: &'static str,
        route: fn(MethodFilter) -> MethodRouter<Arc<Node>>,
    ) -> Endpoint {
        Endpoint {
            method,
            path,
            needs_api_key: true,
            route,
        }
    }
}

/// Every endpoint the router serves besides the WebSocket upgrade and static files. Room and
/// conversation history join with durable delivery as `GET /api/rooms/{room}/history` and
/// `GET /api/conversations/{user}/{other}/history`.
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint::open(Method::GET, "/health", |m| on(m, health::health)),
    Endpoint::open(Method::GET, "/ready", |m| on(m, health::ready)),
    Endpoint::open(Method::GET, "/metrics", |m| on(m, metrics::metrics)),
    Endpoint::api(Method::POST, "/api/publish", |m| {
        on(m, api::messages::publish)
    }),
    Endpoint::api(Method::POST, "/api/send", |m| on(m, api::messages::send)),
    Endpoint::api(Method::POST, "/api/broadcast", |m| {
        on(m, api::messages::broadcast)
    }),
    Endpoint::api(Method::GET, "/api/rooms", |m| on(m, api::rooms::list)),
    Endpoint::api(Method::GET, "/api/rooms/{room}/members", |m| {
        on(m, api::rooms::members)
    }),
    Endpoint::api(Method::GET, "/api/users/{user}", |m| {
        on(m, api::users::status)
    }),
    Endpoint::api(Method::GET, "/api/rooms/{room}/history", |m| {
        on(m, api::history::room)
    }),
    Endpoint::api(
        Method::GET,
        "/api/conversations/{user}/{other}/history",
        |m| on(m, api::history::conversation),
    ),
    Endpoint::api(Method::POST, "/api/users/{user}/disconnect", |m| {
        on(m, api::users::disconnect)
    }),
    Endpoint::api(Method::GET, "/api/connections", |m| {
        on(m, api::connections::list)
    }),
    Endpoint::api(Method::GET, "/api/connections/{id}", |m| {
        on(m, api::connections::one)
    }),
];

pub fn app(node: Arc<Node>) -> Router {
    // Once per process; here so the metric descriptions exist before the first scrape.
    crate::metrics::install();
    let mut open = Router::new();
    let mut keyed = Router::new();
    for endpoint in ENDPOINTS {
        let filter = MethodFilter::try_from(endpoint.method.clone())
            .expect("ENDPOINTS uses only methods axum can route");
        let route = (endpoint.route)(filter);
        if endpoint.needs_api_key {
            keyed = keyed.route(endpoint.path, route);
        } else {
            open = open.route(endpoint.path, route);
        }
    }
    let keyed = keyed.route_layer(axum::middleware::from_fn_with_state(
        node.clone(),
        api::authenticate,
    ));
    let mut router = open
        .merge(keyed)
        .route("/api", any(api::no_such_endpoint))
        .route("/api/{*rest}", any(api::no_such_endpoint))
        .route("/ws", get(upgrade::websocket))
        .route("/ws/{room}", get(upgrade::websocket_in_room))
        .route("/herald.js", get(dev::client_library))
        // Connections still waiting for their `auth` message: counted here, at the door, not
        // by the node, which only ever sees authenticated connections.
        .layer(Extension(Arc::new(PendingAuth::default())));
    // Absent, not refused, when off: nothing about it shows in production.
    if node.config().auth.dev_login {
        router = router.route("/dev/token", post(dev::token));
    }
    if let Some(files) = static_files::service(&node.config().static_files) {
        router = router.merge(files);
    }
    if let Some(policy) = host::HostPolicy::from_config(node.config()) {
        router = router.layer(axum::middleware::from_fn_with_state(policy, host::check));
    }
    router.with_state(node)
}
