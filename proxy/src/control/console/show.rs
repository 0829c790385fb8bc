//! The console's `SHOW` result sets, read from the node's state when
//! asked: pools and servers (`backend::pool`), traffic counters
//! (`crate::stats`), the configuration in use, the pause state, and the
//! replicated catalog (shards, ranges, tables, functions, jobs, nodes).
//! Columns named as PgBouncer 1.18 names them where the meaning is the
//! same; the node's own columns come after them.

use super::{ConsoleError, Table, HELP};
use crate::backend::conn::ServerInfo;
use crate::error::sqlstate;
use crate::node::Node;
use std::time::SystemTime;

pub(super) fn show(node: &Node, what: &str) -> Result<Table, ConsoleError> {
    Ok(match what {
        "HELP" => {
            let mut t = Table::new(&["command"]);
            let (shows, rest) = HELP.split_once("; ").unwrap_or((HELP, ""));
            for c in shows.trim_start_matches("SHOW ").split(" | ") {
                t.row(vec![format!("SHOW {c}")]);
            }
            for c in rest.split("; ") {
                t.row(vec![c.to_string()]);
            }
            t
        }
        "VERSION" => {
            let mut t = Table::new(&["version"]);
            t.row(vec![format!("hotrepart {}", env!("CARGO_PKG_VERSION"))]);
            t
        }
        "POOLS" => pools(node),
        "STATS" => stats(node),
        "SERVERS" => servers(node),
        "DATABASES" | "SHARDS" => shards(node, what == "DATABASES"),
        "CLIENTS" => clients(node),
        "LISTS" => {
            let snap = node.routing.catalog.load_full();
            let mut t = Table::new(&["list", "items"]);
            t.row(vec!["databases".into(), snap.shards().count().to_string()]);
            t.row(vec!["pools".into(), node.pools.all().len().to_string()]);
            t.row(vec!["used_clients".into(), node.client_count().to_string()]);
            t.row(vec!["ranges".into(), snap.ranges().len().to_string()]);
            t
        }
        "CONFIG" => config(node),
        "STATE" => {
            let (all, dbs) = node.pause.paused();
            let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
            let mut t = Table::new(&["key", "value"]);
            t.row(vec!["active".into(), yes(!all)]);
            t.row(vec!["paused".into(), yes(all)]);
            t.row(vec!["suspended".into(), yes(false)]);
            t.row(vec!["paused_databases".into(), dbs.join(",")]);
            t.row(vec![
                "waiting_clients".into(),
                node.pause.waiting().to_string(),
            ]);
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
        "TABLES" => tables(node),
        "FUNCTIONS" => functions(node),
        "JOBS" => jobs(node),
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

fn pool_mode(node: &Node) -> String {
    format!("{:?}", node.cfg().pool_mode).to_lowercase()
}

/// A pool per (shard, database, client user), as PgBouncer's per
/// (database, user); `server_user` logs in to the shard.
fn pools(node: &Node) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "pool_size",
        "pool_mode",
        "shard",
        "server_user",
    ]);
    let mut pools = node.pools.all();
    pools.sort_by(|a, b| {
        (&a.0 .1, &a.0 .2, &a.1.target.shard).cmp(&(&b.0 .1, &b.0 .2, &b.1.target.shard))
    });
    let mode = pool_mode(node);
    for ((_, database, user), p) in pools {
        if user.starts_with('\u{0}') {
            continue;
        }
        t.row(vec![
            database,
            user,
            p.waiting_count().to_string(),
            p.busy_count().to_string(),
            p.idle_count().to_string(),
            p.size().to_string(),
            mode.clone(),
            p.target.shard.clone(),
            p.target.user.clone(),
        ]);
    }
    t
}

/// PgBouncer's `SHOW STATS`: per client database, since the node started
/// (`total_*`) and over the last stats period (`avg_*`); times in
/// microseconds.
fn stats(node: &Node) -> Table {
    let mut t = Table::new(&[
        "database",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ]);
    for (db, s, a) in node.stats.list() {
        t.row(
            [
                s.xact_count,
                s.query_count,
                s.received,
                s.sent,
                s.xact_time_us,
                s.query_time_us,
                s.wait_time_us,
                a.xact_count,
                a.query_count,
                a.recv,
                a.sent,
                a.xact_time,
                a.query_time,
                a.wait_time,
            ]
            .iter()
            .fold(vec![db], |mut v, n| {
                v.push(n.to_string());
                v
            }),
        );
    }
    t
}

/// PgBouncer 1.18's columns of `SHOW SERVERS` and `SHOW CLIENTS`, in its
/// order; the node's own columns follow them.
const CONNECTION_COLUMNS: [&str; 18] = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
];

/// PgBouncer's `SHOW SERVERS`: every backend connection of every pool,
/// then the shard it belongs to.
fn servers(node: &Node) -> Table {
    let mut t = Table::new(&[&CONNECTION_COLUMNS[..], &["shard"]].concat());
    let lifetime = node.cfg().server_lifetime();
    let mut pools = node.pools.all();
    pools.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, p) in pools {
        let (addr, port) = match &p.target.addr {
            Ok(a) => (a.ip().to_string(), a.port().to_string()),
            Err(_) => (String::new(), String::new()),
        };
        let mut servers = p.servers();
        servers.sort_by_key(|s| s.connect_time);
        for s in servers {
            let old = lifetime.is_some_and(|l| s.connect_time.elapsed().is_ok_and(|age| age >= l));
            let link = s.link();
            t.row(vec![
                "S".into(),
                p.target.user.clone(),
                p.target.database.clone(),
                if s.state() == ServerInfo::ACTIVE {
                    "active"
                } else {
                    "idle"
                }
                .into(),
                addr.clone(),
                port.clone(),
                s.local_addr.map(|a| a.ip().to_string()).unwrap_or_default(),
                s.local_addr
                    .map(|a| a.port().to_string())
                    .unwrap_or_default(),
                timestamp(s.connect_time),
                timestamp(s.request_time()),
                "0".into(),
                "0".into(),
                u8::from(old).to_string(),
                format!("{:x}", std::sync::Arc::as_ptr(&s) as usize),
                if link == 0 {
                    String::new()
                } else {
                    format!("{link:x}")
                },
                s.remote_pid.to_string(),
                String::new(),
                String::new(),
                p.target.shard.clone(),
            ]);
        }
    }
    t
}

/// One row per logged-in client (the admin console's own sessions
/// included, as PgBouncer lists them), oldest first. `ptr` is the
/// session's id, which SHOW SERVERS gives as `link` of the backends it
/// holds; `link` lists those backends' `ptr`, `shards` their shards.
fn clients(node: &Node) -> Table {
    let mut t = Table::new(&[&CONNECTION_COLUMNS[..], &["pid", "shards"]].concat());
    // Backends held, by session id: (ptr, shard).
    let mut held: std::collections::HashMap<u64, Vec<(String, String)>> =
        std::collections::HashMap::new();
    for (_, p) in node.pools.all() {
        for s in p.servers() {
            let link = s.link();
            if link != 0 {
                held.entry(link).or_default().push((
                    format!("{:x}", std::sync::Arc::as_ptr(&s) as usize),
                    p.target.shard.clone(),
                ));
            }
        }
    }
    let slots: Vec<_> = node
        .cancels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    let mut rows: Vec<_> = slots
        .iter()
        .filter_map(|slot| slot.info.get().map(|i| (slot.id(), i)))
        .collect();
    rows.sort_by_key(|(id, i)| (i.connect_time, *id));
    for (id, i) in rows {
        let wait = i.wait();
        let mut links = held.remove(&id).unwrap_or_default();
        links.sort();
        let (ptrs, shards): (Vec<_>, Vec<_>) = links.into_iter().unzip();
        let addr = |a: Option<std::net::SocketAddr>| {
            a.map_or((String::new(), String::new()), |a| {
                (a.ip().to_string(), a.port().to_string())
            })
        };
        let (host, port) = addr(i.addr);
        let (local_host, local_port) = addr(i.local_addr);
        t.row(vec![
            "C".into(),
            i.user.clone(),
            i.database.clone(),
            if wait.is_some() { "waiting" } else { "active" }.into(),
            host,
            port,
            local_host,
            local_port,
            timestamp(i.connect_time),
            timestamp(i.request_time()),
            wait.map_or(0, |w| w.as_secs()).to_string(),
            wait.map_or(0, |w| w.subsec_micros()).to_string(),
            "0".into(),
            format!("{id:x}"),
            ptrs.join(","),
            "0".into(),
            i.tls.clone(),
            i.application_name.clone(),
            i.pid.to_string(),
            shards.join(","),
        ]);
    }
    t
}

fn shards(node: &Node, databases: bool) -> Table {
    let mut t = if databases {
        Table::new(&["name", "host", "port", "pool_size", "pool_mode"])
    } else {
        Table::new(&["name", "host", "port", "ranges_owned"])
    };
    let snap = node.routing.catalog.load_full();
    let shards = node.routing.shards.load();
    let (size, mode) = (node.cfg().pool_size, pool_mode(node));
    for s in shards.list.iter() {
        let (host, port) = match &s.addr {
            Ok(a) => (a.ip().to_string(), a.port().to_string()),
            Err(e) => (format!("unresolved: {e}"), String::new()),
        };
        if databases {
            t.row(vec![
                s.name.clone(),
                host,
                port,
                size.to_string(),
                mode.clone(),
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

fn config(node: &Node) -> Table {
    let c = node.cfg();
    let ms = |v: u64| v.to_string();
    let mut t = Table::new(&["key", "value"]);
    for (k, v) in [
        ("listen", c.listen.clone()),
        ("pool_mode", pool_mode(node)),
        ("pool_size", c.pool_size.to_string()),
        ("pool_timeout_ms", ms(c.pool_timeout_ms)),
        ("connect_timeout_ms", ms(c.connect_timeout_ms)),
        (
            "max_client_connections",
            c.max_client_connections.to_string(),
        ),
        ("max_pending_logins", c.max_pending_logins.to_string()),
        ("max_message_size", c.max_message_size.to_string()),
        ("client_idle_timeout_ms", ms(c.client_idle_timeout_ms)),
        (
            "idle_in_transaction_timeout_ms",
            ms(c.idle_in_transaction_timeout_ms),
        ),
        ("client_login_timeout_ms", ms(c.client_login_timeout_ms)),
        ("server_lifetime_ms", ms(c.server_lifetime_ms)),
        ("server_idle_timeout_ms", ms(c.server_idle_timeout_ms)),
        ("server_silence_timeout_ms", ms(c.server_silence_timeout_ms)),
        ("query_wait_timeout_ms", ms(c.query_wait_timeout_ms)),
        ("max_merge_rows", c.max_merge_rows.to_string()),
        ("max_merge_bytes", c.max_merge_bytes.to_string()),
        ("max_parse_bytes", c.max_parse_bytes.to_string()),
        (
            "max_session_buffer_bytes",
            c.max_session_buffer_bytes.to_string(),
        ),
        (
            "max_prepared_statements",
            c.max_prepared_statements.to_string(),
        ),
        (
            "max_prepared_statement_bytes",
            c.max_prepared_statement_bytes.to_string(),
        ),
        (
            "server_prepared_statements",
            c.server_prepared_statements.to_string(),
        ),
        ("freeze_wait_ms", ms(c.freeze_wait_ms)),
        ("twopc_decision_timeout_ms", ms(c.twopc_decision_timeout_ms)),
        ("admin_users", c.admin_users.join(",")),
        ("log_level", c.log_level.clone().unwrap_or_default()),
        ("node_id", c.effective_node_id().to_string()),
    ] {
        t.row(vec![k.to_string(), v]);
    }
    t
}

/// The declared tables of the routing table: sharded (key, type, routing
/// function) and reference tables.
fn tables(node: &Node) -> Table {
    let snap = node.routing.catalog.load_full();
    let catalog = node.catalog_handle.catalog();
    let mut t = Table::new(&["name", "kind", "key", "key_type", "function"]);
    for s in snap.sharded_tables() {
        let function = match &s.function {
            hotrepart_router::catalog::RoutingFunction::PgHash { seed } => {
                format!("hash (seed {seed})")
            }
            hotrepart_router::catalog::RoutingFunction::Wasm { id } => {
                let names = catalog.function_names(*id);
                format!("wasm {} ({})", names.join(","), id.short())
            }
        };
        t.row(vec![
            s.name.clone(),
            "sharded".into(),
            s.key_column.clone(),
            s.key_type.to_string(),
            function,
        ]);
    }
    for r in snap.reference_tables() {
        t.row(vec![
            r.to_string(),
            "reference".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    t
}

/// The WebAssembly routing functions in the catalog and the tables that
/// use them.
fn functions(node: &Node) -> Table {
    let snap = node.routing.catalog.load_full();
    let catalog = node.catalog_handle.catalog();
    let mut t = Table::new(&["name", "id", "size_bytes", "tables"]);
    for (name, f) in catalog.functions() {
        let tables: Vec<&str> = snap
            .sharded_tables()
            .filter(|s| s.function.wasm_id() == Some(f.id))
            .map(|s| s.name.as_str())
            .collect();
        t.row(vec![
            name.to_string(),
            f.id.to_string(),
            f.wasm.len().to_string(),
            tables.join(","),
        ]);
    }
    t
}

/// Reshard jobs in the catalog, in the order they started.
fn jobs(node: &Node) -> Table {
    let catalog = node.catalog_handle.catalog();
    let mut t = Table::new(&[
        "id",
        "phase",
        "from_shard",
        "to_shard",
        "lo",
        "hi",
        "rows_copied",
        "lag_bytes",
        "node",
        "note",
    ]);
    let mut jobs: Vec<_> = catalog.jobs().collect();
    jobs.sort_by_key(|(_, j)| j.seq);
    for (id, j) in jobs {
        t.row(vec![
            id.to_string(),
            j.phase.name().to_string(),
            j.spec.from.clone(),
            j.spec.to.clone(),
            j.spec.range.lo.to_string(),
            j.spec
                .range
                .hi
                .map_or_else(|| "end".to_string(), |h| h.to_string()),
            j.rows_copied.to_string(),
            j.lag_bytes.to_string(),
            j.owner.to_string(),
            j.note.clone(),
        ]);
    }
    t
}

/// PgBouncer's time format: `2024-01-31 12:34:56 UTC`.
fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_pgbouncers() {
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_709_210_096);
        assert_eq!(timestamp(t), "2024-02-29 12:34:56 UTC");
    }
}
