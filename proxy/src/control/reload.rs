//! Configuration reload (`RELOAD` on the admin console, SIGHUP): the file
//! the node was started from is read and validated again, and what can
//! change under running clients is applied at once, without dropping any:
//! users and their passwords, `admin_users`, pool sizes and modes, the
//! timeouts and limits read per client or per checkout, `max_merge_rows`,
//! the session memory limits (`max_parse_bytes`,
//! `max_session_buffer_bytes`, `max_prepared_statements`,
//! `max_prepared_statement_bytes`, `server_prepared_statements`: read per
//! statement),
//! `twopc_decision_timeout_ms`, `log_level`, `tls_required`, and TLS: the certificate and
//! key are read again (a rotated certificate serves new clients; clients
//! already connected keep their session).
//!
//! What needs a restart (addresses, the node's identity and its cluster,
//! the admin API, the shards and tables that only seed the replicated
//! catalog, settings read once at start) is refused: logged, reported to
//! the console with SQLSTATE 55P02 (PostgreSQL's "cannot be changed
//! without restarting the server"), and its old value kept — the rest of
//! the file still applies.
//!
//! Guarantee: the configuration the node runs by is always one that
//! `Config::validate` accepted; a file that does not parse or validate
//! changes nothing.

use crate::config::Config;
use crate::node::Node;

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Applied changes, one line each (`pool_size: 8 -> 4`; user names,
    /// never passwords or secrets).
    pub changed: Vec<String>,
    /// Keys that changed in the file but need a restart (their old values
    /// are kept).
    pub refused: Vec<&'static str>,
    /// Parts that could not be applied (a certificate that does not
    /// load): the running ones are kept.
    pub failed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this node was not started from a configuration file, so there is nothing to reload")]
    NoFile,
    #[error("{0}; the configuration in use is unchanged")]
    Config(#[from] crate::config::ConfigError),
}

/// Reads the node's configuration file again and applies it.
pub fn reload(node: &Node) -> Result<Reloaded, ReloadError> {
    let path = node.config_file.get().ok_or(ReloadError::NoFile)?;
    let new = Config::load(path)?;
    Ok(apply(node, new))
}

/// Restart-only keys: compared (by their debug form: they hold no float)
/// and, when changed, put back to the running value.
macro_rules! keep_restart_only {
    ($old:expr, $new:expr, $refused:expr, $($field:ident),* $(,)?) => {
        $(
            if format!("{:?}", $old.$field) != format!("{:?}", $new.$field) {
                $refused.push(stringify!($field));
                $new.$field = $old.$field.clone();
            }
        )*
    };
}

/// Reloadable scalar keys: each change reported as `key: old -> new`.
macro_rules! report_changes {
    ($old:expr, $new:expr, $changed:expr, $($field:ident),* $(,)?) => {
        $(
            if format!("{:?}", $old.$field) != format!("{:?}", $new.$field) {
                $changed.push(format!(
                    "{}: {:?} -> {:?}",
                    stringify!($field),
                    $old.$field,
                    $new.$field
                ));
            }
        )*
    };
}

/// Applies `new` (already validated) to the running node: see the module
/// documentation for what changes and what is refused.
pub fn apply(node: &Node, mut new: Config) -> Reloaded {
    let old = node.cfg();
    let mut r = Reloaded::default();
    keep_restart_only!(
        old,
        new,
        r.refused,
        listen,
        node_id,
        cluster,
        admin,
        data_dir,
        shards,
        home_shard,
        sharded_tables,
        reference_tables,
        functions,
        initial_ranges,
        plan_cache_size,
        freeze_wait_ms,
        twopc_grace_ms,
        twopc_resolver_interval_ms,
    );
    report_changes!(
        old,
        new,
        r.changed,
        pool_mode,
        pool_size,
        pool_timeout_ms,
        connect_timeout_ms,
        max_client_connections,
        max_message_size,
        client_login_timeout_ms,
        max_pending_logins,
        server_lifetime_ms,
        server_idle_timeout_ms,
        client_idle_timeout_ms,
        idle_in_transaction_timeout_ms,
        server_silence_timeout_ms,
        query_wait_timeout_ms,
        max_merge_rows,
        max_merge_bytes,
        max_parse_bytes,
        max_session_buffer_bytes,
        max_prepared_statements,
        max_prepared_statement_bytes,
        server_prepared_statements,
        auth_failure_delay_ms,
        cutover_idle_grace_ms,
        twopc_decision_timeout_ms,
        admin_users,
        log_level,
    );
    // Client TLS policy (checked per login).
    report_changes!(old, new, r.changed, tls_required);
    // Shard TLS policy: fixed in each pool's target when it is made.
    keep_restart_only!(old, new, r.refused, allow_cleartext_shard_password);
    // Users: names only. A user whose shard login changed (or who is
    // gone) gets new pools; clients already connected keep theirs.
    let mut relogin = Vec::new();
    for u in &new.users {
        match old.user(&u.name) {
            None => r.changed.push(format!("users: {} added", u.name)),
            Some(o) => {
                if o.auth != u.auth || o.password_hash != u.password_hash {
                    r.changed
                        .push(format!("users: {} password or auth changed", u.name));
                }
                if o.server_user != u.server_user || o.server_password != u.server_password {
                    r.changed
                        .push(format!("users: {} server login changed", u.name));
                    relogin.push(u.name.clone());
                }
                if o.pool_mode != u.pool_mode {
                    r.changed.push(format!(
                        "users: {} pool_mode {:?} -> {:?}",
                        u.name, o.pool_mode, u.pool_mode
                    ));
                }
            }
        }
    }
    for o in &old.users {
        if new.user(&o.name).is_none() {
            r.changed.push(format!(
                "users: {} removed (connected clients stay)",
                o.name
            ));
            relogin.push(o.name.clone());
        }
    }
    // TLS: the files are read again at every reload (a rotated
    // certificate keeps its path); one that does not load keeps the
    // running acceptor and section.
    match &new.tls {
        Some(t) => match crate::node::load_tls(&t.cert, &t.key) {
            Ok(tls) => {
                node.tls.store(Some(std::sync::Arc::new(tls)));
                if format!("{:?}", old.tls) != format!("{:?}", new.tls) {
                    r.changed
                        .push(format!("tls: {} (new clients)", t.cert.display()));
                } else {
                    tracing::info!(cert = %t.cert.display(), "RELOAD: TLS certificate and key read again");
                }
            }
            Err(e) => {
                r.failed
                    .push(format!("tls: {e}; the running certificate is kept"));
                new.tls = old.tls.clone();
            }
        },
        None if old.tls.is_some() => {
            node.tls.store(None);
            r.changed
                .push("tls: off (new clients connect in plain text only)".into());
        }
        None => {}
    }
    let log_changed = old.log_level != new.log_level;
    drop(old);
    let settings = Node::pool_settings(&new);
    let log_level = new.log_level.clone();
    node.set_cfg(new);
    node.pools.forget_users(&relogin);
    for (_, pool) in node.pools.all() {
        pool.apply(&settings);
    }
    if log_changed {
        if let (Some(set), Some(level)) = (node.log_filter.get(), log_level) {
            match set(&level) {
                Ok(()) => tracing::debug!("log filter set to {level}"),
                Err(e) => {
                    tracing::warn!(log_level = %level, error = %e, "RELOAD: log_level not applied")
                }
            }
        }
    }
    for c in &r.changed {
        tracing::info!(change = %c, "configuration reloaded");
    }
    for f in &r.failed {
        tracing::error!("configuration reload: {f}");
    }
    for k in &r.refused {
        tracing::warn!(
            key = k,
            "configuration reload: {k} changed in the file but needs a restart; the running value is kept"
        );
    }
    if r.changed.is_empty() && r.refused.is_empty() && r.failed.is_empty() {
        tracing::info!("configuration reloaded: no change");
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        listen = "127.0.0.1:6432"
        pool_size = 4
        [[shards]]
        name = "s0"
        dsn = "host=127.0.0.1 port=1"
        [[users]]
        name = "app"
        auth = "trust"
    "#;

    fn node(text: &str) -> std::sync::Arc<Node> {
        Node::new(Config::from_toml(text).expect("config")).expect("node")
    }

    #[tokio::test]
    async fn reloadable_keys_apply_and_restart_only_keys_are_kept() {
        let n = node(BASE);
        let text = BASE
            .replace(
                "pool_size = 4",
                "pool_size = 2\nquery_wait_timeout_ms = 7\nmax_session_buffer_bytes = 1000",
            )
            .replace("127.0.0.1:6432", "127.0.0.1:7000")
            + "[[users]]\nname = \"new\"\nauth = \"trust\"\n";
        let r = apply(&n, Config::from_toml(&text).expect("config"));
        assert_eq!(r.refused, vec!["listen"]);
        assert!(
            r.changed.contains(&"pool_size: 4 -> 2".to_string()),
            "{r:?}"
        );
        assert!(r.changed.contains(&"users: new added".to_string()), "{r:?}");
        let c = n.cfg();
        assert_eq!(c.listen, "127.0.0.1:6432");
        assert_eq!(c.pool_size, 2);
        assert_eq!(c.query_wait_timeout_ms, 7);
        // The session memory limits are read per statement: they apply.
        assert_eq!(c.max_session_buffer_bytes, 1000);
        assert!(
            r.changed
                .contains(&"max_session_buffer_bytes: 134217728 -> 1000".to_string()),
            "{r:?}"
        );
        assert!(c.user("new").is_some());
        // The same file again: nothing changes.
        let again = apply(&n, Config::from_toml(&text).expect("config"));
        assert_eq!(again.changed, Vec::<String>::new());
        assert_eq!(again.refused, vec!["listen"]);
    }

    #[tokio::test]
    async fn without_a_file_there_is_nothing_to_reload() {
        let n = node(BASE);
        assert!(matches!(reload(&n), Err(ReloadError::NoFile)));
    }
}
