//! The admin console over the PostgreSQL protocol: a client that connects
//! to the virtual database `hotrepart` as one of the `admin_users` (after
//! the usual authentication) talks to the node itself, not to a shard,
//! with PgBouncer's commands where they overlap (`SHOW POOLS`, `SHOW
//! DATABASES`, `SHOW CONFIG`, `SHOW VERSION`, `SHOW LISTS`, `SHOW CLIENTS`
//! as a count) and the node's own (`SHOW SHARDS`, `SHOW RANGES`, `SHOW
//! NODES`, `SHOW HELP`). Columns are text; names follow PgBouncer's where
//! the meaning is the same, so DBAs' habits and exporters that read them
//! work. Simple queries only (as PgBouncer's console); anything else gets a
//! clear error and the session goes on.

use crate::error::sqlstate;
use crate::node::Node;
use crate::wire::{self, be, fe, FrameReader, Severity};
use bytes::{BufMut, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// The virtual database of the console.
pub const DATABASE: &str = "hotrepart";

/// A result set: column names and rows of text (None: NULL).
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[&'static str]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, values: Vec<String>) {
        self.rows.push(values.into_iter().map(Some).collect());
    }

    fn write(&self, out: &mut BytesMut) {
        wire::text_row_description(out, &self.columns);
        for r in &self.rows {
            wire::text_data_row(out, r);
        }
    }
}

/// Serves an admin console session until the client leaves.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(node: Arc<Node>, mut r: FrameReader<S>) {
    loop {
        let Ok(f) = r.next().await else {
            return;
        };
        let mut out = BytesMut::new();
        match f.tag() {
            fe::QUERY => {
                let mut b = f.body();
                match wire::get_cstr(&mut b) {
                    Ok(sql) => match answer(&node, sql) {
                        Ok(Some((t, tag))) => {
                            t.write(&mut out);
                            out.put_slice(&wire::command_complete(&tag));
                        }
                        Ok(None) => wire::frame(&mut out, be::EMPTY_QUERY_RESPONSE, |_| {}),
                        Err((code, msg)) => {
                            wire::error_response(&mut out, Severity::Error, code, &msg)
                        }
                    },
                    Err(_) => wire::error_response(
                        &mut out,
                        Severity::Error,
                        sqlstate::PROTOCOL_VIOLATION,
                        "invalid Query message",
                    ),
                }
                wire::ready_for_query(&mut out, wire::tx::IDLE);
            }
            fe::TERMINATE => return,
            fe::SYNC => {
                wire::error_response(
                    &mut out,
                    Severity::Error,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the admin console accepts simple queries only",
                );
                wire::ready_for_query(&mut out, wire::tx::IDLE);
            }
            // Other extended-protocol messages: answered at their Sync.
            _ => continue,
        }
        if r.get_mut().write_all(&out).await.is_err() {
            return;
        }
    }
}

const HELP: &str =
    "SHOW HELP | VERSION | POOLS | DATABASES | CLIENTS | LISTS | CONFIG | SHARDS | RANGES | NODES";

/// The answer to one console command: a table and its command tag, None
/// for an empty query, or an error.
fn answer(node: &Node, sql: &str) -> Result<Option<(Table, String)>, (&'static str, String)> {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let t = match words.as_slice() {
        [] => return Ok(None),
        ["SHOW", what] => show(node, what)?,
        _ => {
            return Err((
                sqlstate::SYNTAX_ERROR,
                format!(
                    "unknown admin console command \"{}\"; commands: {HELP}",
                    sql.trim()
                ),
            ))
        }
    };
    Ok(Some((t, "SHOW".into())))
}

fn show(node: &Node, what: &str) -> Result<Table, (&'static str, String)> {
    Ok(match what {
        "HELP" => {
            let mut t = Table::new(&["command"]);
            for c in HELP.split(" | ") {
                t.row(vec![format!("SHOW {c}")]);
            }
            t
        }
        "VERSION" => {
            let mut t = Table::new(&["version"]);
            t.row(vec![format!("hotrepart {}", env!("CARGO_PKG_VERSION"))]);
            t
        }
        "POOLS" => {
            // A pool per (shard, database, client user), as PgBouncer's per
            // (database, user); `server_user` logs in to the shard.
            let mut t = Table::new(&[
                "database",
                "user",
                "shard",
                "server_user",
                "sv_active",
                "sv_idle",
                "pool_size",
                "pool_mode",
            ]);
            let mut pools = node.pools.all();
            pools.sort_by(|a, b| {
                (&a.0 .1, &a.0 .2, &a.1.target.shard).cmp(&(&b.0 .1, &b.0 .2, &b.1.target.shard))
            });
            for ((_, database, user), p) in pools {
                t.row(vec![
                    database,
                    user,
                    p.target.shard.clone(),
                    p.target.user.clone(),
                    p.busy_count().to_string(),
                    p.idle_count().to_string(),
                    p.size().to_string(),
                    format!("{:?}", node.cfg.pool_mode).to_lowercase(),
                ]);
            }
            t
        }
        "DATABASES" | "SHARDS" => {
            let mut t = if what == "DATABASES" {
                Table::new(&["name", "host", "port", "pool_size", "pool_mode"])
            } else {
                Table::new(&["name", "host", "port", "ranges_owned"])
            };
            let snap = node.routing.catalog.load_full();
            let shards = node.routing.shards.load();
            for s in shards.list.iter() {
                let (host, port) = match &s.addr {
                    Ok(a) => (a.ip().to_string(), a.port().to_string()),
                    Err(e) => (format!("unresolved: {e}"), String::new()),
                };
                if what == "DATABASES" {
                    t.row(vec![
                        s.name.clone(),
                        host,
                        port,
                        node.cfg.pool_size.to_string(),
                        format!("{:?}", node.cfg.pool_mode).to_lowercase(),
                    ]);
                } else {
                    let owned = snap
                        .ranges()
                        .iter()
                        .filter(|r| r.write_owner.as_str() == s.name)
                        .count();
                    t.row(vec![s.name.clone(), host, port, owned.to_string()]);
                }
            }
            t
        }
        "CLIENTS" => {
            let mut t = Table::new(&["clients"]);
            t.row(vec![node.client_count().to_string()]);
            t
        }
        "LISTS" => {
            let snap = node.routing.catalog.load_full();
            let mut t = Table::new(&["list", "items"]);
            t.row(vec!["databases".into(), snap.shards().count().to_string()]);
            t.row(vec!["pools".into(), node.pools.all().len().to_string()]);
            t.row(vec!["used_clients".into(), node.client_count().to_string()]);
            t.row(vec!["ranges".into(), snap.ranges().len().to_string()]);
            t
        }
        "CONFIG" => {
            let c = &node.cfg;
            let mut t = Table::new(&["key", "value"]);
            for (k, v) in [
                ("listen", c.listen.clone()),
                ("pool_mode", format!("{:?}", c.pool_mode).to_lowercase()),
                ("pool_size", c.pool_size.to_string()),
                ("pool_timeout_ms", c.pool_timeout_ms.to_string()),
                ("connect_timeout_ms", c.connect_timeout_ms.to_string()),
                (
                    "max_client_connections",
                    c.max_client_connections.to_string(),
                ),
                ("max_message_size", c.max_message_size.to_string()),
                (
                    "client_idle_timeout_ms",
                    c.client_idle_timeout_ms.to_string(),
                ),
                (
                    "idle_in_transaction_timeout_ms",
                    c.idle_in_transaction_timeout_ms.to_string(),
                ),
                (
                    "client_login_timeout_ms",
                    c.client_login_timeout_ms.to_string(),
                ),
                ("admin_users", c.admin_users.join(",")),
            ] {
                t.row(vec![k.to_string(), v]);
            }
            t
        }
        "RANGES" => {
            let snap = node.routing.catalog.load_full();
            let mut t = Table::new(&["lo", "hi", "read_owner", "write_owner", "status"]);
            for r in snap.ranges() {
                t.row(vec![
                    r.lo.to_string(),
                    r.hi.map_or_else(|| "end".to_string(), |h| h.to_string()),
                    r.read_owner.as_str().to_string(),
                    r.write_owner.as_str().to_string(),
                    format!("{:?}", r.status),
                ]);
            }
            t
        }
        "NODES" => {
            let s = serde_json::to_value(node.catalog_handle.status()).unwrap_or_default();
            let mut t = Table::new(&["key", "value"]);
            if let Some(m) = s.as_object() {
                for (k, v) in m {
                    t.row(vec![k.clone(), v.to_string()]);
                }
            }
            t
        }
        other => {
            return Err((
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("SHOW {other} is not supported by the admin console; commands: {HELP}"),
            ))
        }
    })
}
