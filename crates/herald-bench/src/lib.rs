//! herald-bench: a load tool for Herald and the servers it is compared with.
//!
//! One process opens many WebSocket connections on one tokio runtime, sets them up the way a
//! scenario says (users, rooms), sends at an open-loop target rate and measures, for every
//! delivered message, the time since the send instant written inside its payload.
//!
//! # Layout
//! - [`adapter`]: one [`adapter::Protocol`] per server (Herald, the Node `ws` peer, Socket.IO):
//!   the URL, the frames for join / publish / direct, and the decoding of what comes back.
//! - [`stamp`]: the bench payload, `{"hb_t":<send instant>,…}`, and the scan that finds it.
//! - [`client`]: opening a connection (source address, handshake) and its task.
//! - [`pacer`]: the open-loop schedule that spreads a message rate over the senders.
//! - [`recorder`]: sharded latency histograms and delivery counters.
//! - [`scenario`]: fanout, rooms, direct (traffic), connect (handshakes/s), idle (memory),
//!   soak (resources under long churn), join-storm (a big room forming at once). Connections
//!   can be spread over several addresses of one service (nodes sharing Redis).
//! - [`spawned`]: a Herald server the tool starts itself (`soak --spawn-server`).
//! - [`procfs`]: CPU time and RSS of the server (summed over its processes) and of this
//!   process, the load average.
//! - [`net`]: the open-file limit and source addresses spread over 127.0.0.0/8.
//! - [`tokens`]: HS256 tokens minted with the server's secret.
//! - [`report`]: results as a table and as JSON; [`compare`] folds several runs into one
//!   table with Herald/peer ratios; [`chart`] draws latency against offered load as SVG.

pub mod adapter;
pub mod chart;
pub mod client;
pub mod compare;
pub mod net;
pub mod pacer;
pub mod procfs;
pub mod recorder;
pub mod report;
pub mod scenario;
pub mod spawned;
pub mod stamp;
pub mod tokens;
