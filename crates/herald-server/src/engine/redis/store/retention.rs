//! Retention: finding every stream with `SCAN` (on the Redis, or on each Cluster primary) and
//! pruning each one step by step.

use redis::Value;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};

use super::requests::failed;
use super::{Connection, MARKS, META, RedisStore, SCRIPTS, SEEN, STREAM, USES};
use crate::engine::redis::replies::{fields, int, text, unexpected};
use crate::engine::store::{PruneReport, Retention, StoreError};

/// Most entries one retention step removes from one stream (one script, during which Redis
/// serves nothing else).
const PRUNE_BUDGET: u64 = 1000;

/// Keys a `SCAN` step looks at while a retention pass looks for streams.
const SCAN_COUNT: u64 = 1000;

impl RedisStore {
    /// The servers whose keys a retention pass scans: the one Redis, or every Cluster primary
    /// (`host`, `port`), since `SCAN` walks one server's keys.
    pub(super) async fn scanned_servers(&self) -> Result<Vec<Option<(String, u16)>>, StoreError> {
        let Connection::Cluster(connection) = &self.connection else {
            return Ok(vec![None]);
        };
        let every_primary = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        let replies = connection
            .clone()
            .route_command(redis::cmd("PING"), every_primary)
            .await
            .map_err(failed("prune"))?;
        let Value::Map(replies) = replies else {
            return Err(unexpected("prune"));
        };
        replies
            .into_iter()
            .map(|(address, _)| {
                let address = text(address).ok_or_else(|| unexpected("prune"))?;
                let (host, port) = address
                    .rsplit_once(':')
                    .ok_or_else(|| unexpected("prune"))?;
                let port = port.parse().map_err(|_| unexpected("prune"))?;
                Ok(Some((host.to_owned(), port)))
            })
            .collect()
    }

    /// One `SCAN` step over a server's stream meta keys.
    pub(super) async fn scan_streams(
        &self,
        server: Option<&(String, u16)>,
        cursor: u64,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let pattern = format!("{}:{{*}}:{META}", glob_escape(self.keys.prefix()));
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let reply = match (&self.connection, server) {
            (Connection::Cluster(connection), Some((host, port))) => {
                let server = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                connection
                    .clone()
                    .route_command(scan, RoutingInfo::SingleNode(server))
                    .await
            }
            (connection, _) => scan.query_async(&mut connection.clone()).await,
        };
        redis::from_redis_value(reply.map_err(failed("prune"))?).map_err(|_| unexpected("prune"))
    }

    /// Prunes one stream, step by step, into `report`.
    pub(super) async fn prune_stream(
        &self,
        meta: &str,
        retention: Retention,
        now_ms: u64,
        report: &mut PruneReport,
    ) -> Result<(), StoreError> {
        let Some(base) = meta.strip_suffix(META) else {
            return Ok(());
        };
        let Some(name) = meta
            .strip_prefix(self.keys.prefix())
            .and_then(|rest| rest.strip_prefix(":{"))
        else {
            return Ok(());
        };
        let older_than = |age: std::time::Duration| {
            if age.is_zero() {
                0
            } else {
                now_ms.saturating_sub(age.as_millis() as u64)
            }
        };
        let (kind, keep, old_before, others): (_, _, _, &[&str]) = if name.starts_with("room:") {
            (
                "room",
                retention.room_max_messages,
                older_than(retention.room_max_age),
                &[],
            )
        } else if name.starts_with("user:") {
            (
                "inbox",
                0,
                older_than(retention.inbox_max_age),
                &[MARKS, USES, SEEN],
            )
        } else if name.starts_with("conv:") {
            (
                "conversation",
                0,
                older_than(retention.inbox_max_age),
                &[SEEN],
            )
        } else {
            return Ok(());
        };
        loop {
            let mut invocation = SCRIPTS.prune_stream.prepare_invoke();
            invocation.key(meta).key(format!("{base}{STREAM}"));
            for suffix in others {
                invocation.key(format!("{base}{suffix}"));
            }
            invocation
                .arg(kind)
                .arg(keep)
                .arg(old_before)
                .arg(PRUNE_BUDGET);
            let reply = self.run("prune", invocation).await?;
            let [removed, gone, more] = fields(reply).ok_or_else(|| unexpected("prune"))?;
            let removed = int(&removed).ok_or_else(|| unexpected("prune"))?;
            match kind {
                "room" => report.room_messages += removed,
                "inbox" => report.inbox_entries += removed,
                _ => report.direct_messages += removed,
            }
            report.empty_streams += int(&gone).ok_or_else(|| unexpected("prune"))?;
            if int(&more) != Some(1) {
                return Ok(());
            }
        }
    }
}

/// `text` matched literally by a `SCAN` pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
