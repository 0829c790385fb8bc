//! Node configuration: a typed TOML file. Defaults are documented in
//! `deploy/hotrepart.example.toml`; the CLI only bootstraps.
//!
//! Guarantee: a configuration that `Config::validate` accepts names at least
//! one shard, has unique shard and user names, and every user has a usable
//! authentication method (client passwords are stored only as SCRAM or md5
//! verifiers, never in plain text).

use hotrepart_router::catalog::{KeyType, RoutingFunction, RoutingSnapshot, ShardId, ShardedTable};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A backend is held from the first statement to the ReadyForQuery that
    /// ends the transaction.
    #[default]
    Transaction,
    /// A backend is held for the whole client session.
    Session,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the client listener binds, e.g. "127.0.0.1:6432".
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Users (of `[[users]]`, authenticated as usual) who may connect to
    /// the admin console, the virtual database `hotrepart`.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Backend connections per (shard, database, user). A backend a
    /// session keeps for its temporary objects counts against it.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long a client waits for a free backend before an error.
    #[serde(default = "default_pool_timeout_ms")]
    pub pool_timeout_ms: u64,
    /// Timeout for opening a backend connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: usize,
    /// Largest protocol message accepted from a client, in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// The startup packet, SSL negotiation, TLS handshake and
    /// authentication of a client must end within this; else the socket is
    /// closed (FATAL 57014 once the startup packet is in). 0 = no limit.
    #[serde(default = "default_client_login_timeout_ms")]
    pub client_login_timeout_ms: u64,
    /// Client sockets that may be in the login handshake at once (accepted,
    /// not yet logged in); the next one gets FATAL 53300 and is closed.
    #[serde(default = "default_max_pending_logins")]
    pub max_pending_logins: usize,
    /// A failed authentication (wrong password, unknown role) is answered
    /// only after this delay, as PostgreSQL's `auth_delay`: guessing
    /// passwords costs time. 0 = none.
    #[serde(default = "default_auth_failure_delay_ms")]
    pub auth_failure_delay_ms: u64,
    /// A backend connection older than this is closed when it goes back to
    /// the pool (never inside a transaction) or while idle there. 0 = no
    /// limit.
    #[serde(default = "default_server_lifetime_ms")]
    pub server_lifetime_ms: u64,
    /// A backend connection idle in the pool this long is closed. 0 = never.
    #[serde(default = "default_server_idle_timeout_ms")]
    pub server_idle_timeout_ms: u64,
    /// While the admin console has paused the node (`PAUSE`), a client
    /// needing a server connection waits this long for `RESUME`, then
    /// gets 57P03 (PgBouncer's `query_wait_timeout`). 0 = no limit.
    #[serde(default = "default_query_wait_timeout_ms")]
    pub query_wait_timeout_ms: u64,
    /// Log filter (`info`, `debug`, `hotrepart_proxy=debug,info` …: an
    /// `EnvFilter` directive). Absent: `HOTREPART_LOG`, else `info`.
    /// Applied again by `RELOAD` and SIGHUP.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Close a client idle (outside a transaction) this long; 0 = never.
    #[serde(default)]
    pub client_idle_timeout_ms: u64,
    /// Close a client idle inside a transaction this long; 0 = never.
    #[serde(default)]
    pub idle_in_transaction_timeout_ms: u64,
    /// A shard connection that sends nothing for this long while the node
    /// waits for its answer is taken for stalled: it is closed and the
    /// client's session ends with 08006 naming the shard; 0 = never (a
    /// stalled shard then holds its clients, as a stalled PostgreSQL
    /// would). Set it above the longest statement a client may run.
    #[serde(default)]
    pub server_silence_timeout_ms: u64,
    /// Shard holding every table not declared below (default: the first).
    #[serde(default, alias = "default_shard")]
    pub home_shard: Option<String>,
    /// Tables spread over the shards by a key.
    #[serde(default)]
    pub sharded_tables: Vec<ShardedTableConfig>,
    /// Tables with a full copy on every shard.
    #[serde(default)]
    pub reference_tables: Vec<String>,
    /// WebAssembly routing functions that `[[sharded_tables]]` may name.
    #[serde(default)]
    pub functions: Vec<FunctionConfig>,
    /// Number of key ranges the keyspace is cut into at first start,
    /// assigned round-robin to the shards (default: one per shard).
    #[serde(default)]
    pub initial_ranges: Option<usize>,
    /// Groups (or rows) a multi-shard merge may hold in memory; beyond it the
    /// statement fails with 54000 instead of growing without bound.
    #[serde(default = "default_max_merge_rows")]
    pub max_merge_rows: usize,
    /// Bytes of values (and group keys) a multi-shard merge may hold in
    /// memory; beyond it the statement fails with 53200 (out of memory)
    /// and the node goes on.
    #[serde(default = "default_max_merge_bytes")]
    pub max_merge_bytes: usize,
    /// A statement longer than this (bytes) is not parsed by the node (a
    /// parse takes about a hundred times the text in memory): it is
    /// routed by its words alone — to the home shard when it names no
    /// declared table, to every shard as DDL — or refused with 54000.
    /// 0 = no limit.
    #[serde(default = "default_max_parse_bytes")]
    pub max_parse_bytes: usize,
    /// Bytes of client messages a session may hold unanswered: an
    /// extended-protocol batch (Parse/Bind/Execute …) waiting for its
    /// Sync or Flush. Beyond, the batch fails with 53200 (out of memory)
    /// and the client's messages are skipped up to its Sync, as after any
    /// error; the session goes on. Keep it above `max_message_size`.
    /// 0 = no limit.
    #[serde(default = "default_max_session_buffer_bytes")]
    pub max_session_buffer_bytes: usize,
    /// Named prepared statements one client session may hold; one more
    /// fails with 53200 (DEALLOCATE or Close frees them). 0 = no limit.
    #[serde(default = "default_max_prepared_statements")]
    pub max_prepared_statements: usize,
    /// Bytes of statement text (and parameter types) one client session's
    /// named prepared statements may hold on the node; one more fails with
    /// 53200. 0 = no limit.
    #[serde(default = "default_max_prepared_statement_bytes")]
    pub max_prepared_statement_bytes: usize,
    /// Statements the node keeps prepared on one backend connection (for
    /// all the clients it serves); beyond, the least recently used is
    /// closed there first, and prepared again when a client next uses it.
    /// 0 = no limit.
    #[serde(default = "default_server_prepared_statements")]
    pub server_prepared_statements: usize,
    /// How long a write to a key range frozen for a cut-over waits for the
    /// cut-over to end before it fails with 40001.
    #[serde(default = "default_freeze_wait_ms")]
    pub freeze_wait_ms: u64,
    /// A cut-over waits for the transactions open on the source at its
    /// freeze; one that wrote there and sits idle in its transaction this
    /// long after the freeze is ended (`pg_terminate_backend`: its client
    /// sees the connection to the shard end, its transaction rolled back)
    /// so that the move can finish. 0 = never: the cut-over fails that
    /// attempt after 5 s and retries (a job gives up after 4 attempts).
    #[serde(default = "default_cutover_idle_grace_ms")]
    pub cutover_idle_grace_ms: u64,
    /// Bounded cache of parsed statements.
    #[serde(default = "default_plan_cache_size")]
    pub plan_cache_size: usize,
    /// This node's id, part of the two-phase-commit transaction ids it
    /// makes (`hr_<node_id>_<random>`), so an operator can tell which node
    /// prepared a transaction.
    #[serde(default = "default_node_id")]
    pub node_id: u64,
    /// Two-phase commit: how long a prepared `hr_` transaction may stay
    /// prepared before the resolver finishes it (commit or roll back).
    #[serde(default = "default_twopc_grace_ms")]
    pub twopc_grace_ms: u64,
    /// Two-phase commit: how often the resolver looks for prepared
    /// transactions on the shards.
    #[serde(default = "default_twopc_resolver_interval_ms")]
    pub twopc_resolver_interval_ms: u64,
    /// Two-phase commit: how long a COMMIT waits for its decision to be
    /// recorded before it gives up (SQLSTATE 08007 when the outcome is then
    /// unknown).
    #[serde(default = "default_twopc_decision_timeout_ms")]
    pub twopc_decision_timeout_ms: u64,
    pub shards: Vec<ShardConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    // --- Client TLS policy (issue 17 hardening) ---
    /// Refuse clients that log in without TLS (FATAL 28000, as a
    /// PostgreSQL `hostssl`-only pg_hba). Needs `[tls]`. Reloadable.
    #[serde(default)]
    pub tls_required: bool,
    // --- end client TLS policy ---
    // --- Shard TLS policy (issue 17 hardening) ---
    /// Let a shard that asks for a cleartext password get it over a
    /// connection without TLS (default: refused; the client sees 08006
    /// and the log says why). Needs a restart.
    #[serde(default)]
    pub allow_cleartext_shard_password: bool,
    // --- end shard TLS policy ---
    /// Replication of the routing catalog among nodes (absent: this node
    /// is alone and its catalog lives in memory, or in `data_dir`).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// The HTTP admin API (absent: no admin port).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Where a node without `[cluster]` keeps its catalog log (absent: in
    /// memory; the catalog is then rebuilt from this file at each start and
    /// changes made through the admin API are lost at exit).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

/// `[cluster]`: this node is one replica of the routing catalog.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: non-zero, unique in the cluster.
    pub node_id: u64,
    /// Address the node-to-node (catalog) listener binds.
    pub listen: String,
    /// The other nodes.
    pub peers: Vec<PeerConfig>,
    /// Shared secret authenticating nodes to each other (at least 16
    /// bytes); or `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Directory of the catalog log (created if absent). Required: a
    /// replica that forgets its promises at a restart breaks consensus.
    #[serde(default)]
    pub data_dir: PathBuf,
    /// Lease duration: a node cut off from the quorum stops routing after
    /// this long.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Timer period of the catalog replica.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Compact the catalog log into a snapshot once more than this many
    /// decided entries follow the last one (0: never).
    #[serde(default = "default_compact_after")]
    pub compact_after: usize,
    /// Start as a new node that waits to be added (`proxyctl node add`):
    /// `peers` then names the current members to contact. Once the node
    /// has a membership on disk this is ignored; `peers` is only the seed
    /// membership of a new cluster.
    #[serde(default)]
    pub join: bool,
    /// Lets `POST /v1/debug/partition` cut this node off (tests only).
    #[serde(default)]
    pub allow_fault_injection: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    /// Its `[cluster] listen` address.
    pub addr: String,
    /// Its admin API base URL (admin requests are not forwarded through
    /// it today: catalog changes reach the leader through the log).
    #[serde(default)]
    pub admin: Option<String>,
}

/// `[admin]`: the HTTP admin API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// e.g. "127.0.0.1:7432".
    pub listen: String,
    /// Bearer token every request must carry; or `token_file`.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    // --- Admin API TLS (issue 17 hardening) ---
    /// HTTPS on the admin port: PEM certificate chain and key (both or
    /// neither; the port then serves HTTPS only). Read at start.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM roots this node trusts for other nodes' `https://` admin
    /// addresses (the cut-over's fence calls). Absent: such calls fail.
    #[serde(default)]
    pub cacert: Option<PathBuf>,
    // --- end admin API TLS ---
}

impl AdminConfig {
    /// `(tls_cert, tls_key)` when the admin port serves HTTPS.
    pub fn tls_files(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            _ => None,
        }
    }
}

fn read_secret(
    what: &str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<String, ConfigError> {
    let v = match (inline, file) {
        (Some(s), None) => s.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|source| ConfigError::Read {
                path: f.display().to_string(),
                source,
            })?
            .trim()
            .to_string(),
        _ => {
            return Err(ConfigError::Invalid(format!(
                "{what}: set exactly one of the value and its _file"
            )))
        }
    };
    if v.len() < 16 {
        return Err(ConfigError::Invalid(format!(
            "{what} must be at least 16 bytes long"
        )));
    }
    Ok(v)
}

impl ClusterConfig {
    pub fn secret(&self) -> Result<String, ConfigError> {
        read_secret("[cluster] secret", &self.secret, &self.secret_file)
    }
}

impl AdminConfig {
    pub fn token(&self) -> Result<String, ConfigError> {
        read_secret("[admin] token", &self.token, &self.token_file)
    }
}

fn default_lease_ms() -> u64 {
    2_000
}
fn default_compact_after() -> usize {
    hotrepart_routing_paxos::replica::COMPACT_AFTER
}

fn default_tick_ms() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub name: String,
    /// libpq-style DSN (URL or key=value): host, port, and optionally user
    /// and password the node uses to log in to this shard.
    pub dsn: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedTableConfig {
    /// Table name as PostgreSQL stores it (unquoted names are lower case).
    pub name: String,
    /// The shard-key column.
    pub key: String,
    /// Key type: int2, int4, int8, text, uuid (PostgreSQL names accepted).
    #[serde(rename = "type")]
    pub key_type: String,
    /// Seed of the PostgreSQL-compatible hash (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Name of a `[[functions]]` entry: route by that WebAssembly function
    /// instead of the built-in hash (then `seed` must be left out).
    #[serde(default)]
    pub function: Option<String>,
}

/// A WebAssembly routing function (docs/WASM_ABI.md) in a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The name tables use.
    pub name: String,
    /// A binary `.wasm` or text `.wat` module. A relative path is relative
    /// to the configuration file's directory (to the working directory for
    /// a configuration given as a string).
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    Trust,
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub auth: AuthMethod,
    /// For scram-sha-256: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`
    /// (as `hotrepart hash-password` prints). For md5: `md5<hex>`.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// User the node logs in as on the shards (default: same name).
    #[serde(default)]
    pub server_user: Option<String>,
    /// Password the node uses on the shards (default: the DSN's password).
    #[serde(default)]
    pub server_password: Option<String>,
    /// Per-user override of the pool mode.
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_pool_size() -> usize {
    20
}
fn default_pool_timeout_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_max_client_connections() -> usize {
    10_000
}
fn default_client_login_timeout_ms() -> u64 {
    60_000
}
fn default_max_pending_logins() -> usize {
    1_000
}
fn default_auth_failure_delay_ms() -> u64 {
    500
}
fn default_server_lifetime_ms() -> u64 {
    3_600_000
}
fn default_server_idle_timeout_ms() -> u64 {
    600_000
}
fn default_query_wait_timeout_ms() -> u64 {
    120_000
}
fn default_max_merge_rows() -> usize {
    100_000
}
fn default_max_merge_bytes() -> usize {
    256 << 20
}
fn default_max_parse_bytes() -> usize {
    1 << 20
}
fn default_max_session_buffer_bytes() -> usize {
    // Twice the default max_message_size: a message of the largest size
    // and the Bind/Execute that go with it always fit.
    128 << 20
}
fn default_max_prepared_statements() -> usize {
    10_000
}
fn default_max_prepared_statement_bytes() -> usize {
    64 << 20
}
fn default_server_prepared_statements() -> usize {
    500
}
fn default_cutover_idle_grace_ms() -> u64 {
    2_000
}
fn default_freeze_wait_ms() -> u64 {
    10_000
}
fn default_plan_cache_size() -> usize {
    10_000
}
fn default_node_id() -> u64 {
    1
}
fn default_twopc_grace_ms() -> u64 {
    10_000
}
fn default_twopc_resolver_interval_ms() -> u64 {
    2_000
}
fn default_twopc_decision_timeout_ms() -> u64 {
    5_000
}
fn default_max_message_size() -> usize {
    64 * 1024 * 1024
}

impl Config {
    /// The node's first routing snapshot from this configuration: the
    /// tables of [`Config::snapshot`] with the `[[functions]]` they use
    /// compiled (by `cache`) and attached. (Until the replicated catalog
    /// seeds the node.)
    pub fn routing_snapshot(
        &self,
        cache: &crate::routing::functions::FunctionCache,
    ) -> Result<hotrepart_router::catalog::RoutingSnapshot, crate::routing::functions::FunctionError>
    {
        use crate::routing::functions::{module_id, FunctionError};
        let snapshot = self
            .snapshot()
            .map_err(|e| FunctionError::Config(e.to_string()))?;
        let modules = self
            .function_modules()
            .map_err(|e| FunctionError::Config(e.to_string()))?;
        cache.resolve(
            snapshot,
            modules
                .iter()
                .map(|(_, wasm)| (module_id(wasm), wasm.as_slice())),
        )
    }

    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })?;
        if let Some(dir) = path.parent() {
            for f in &mut cfg.functions {
                if f.path.is_relative() {
                    f.path = dir.join(&f.path);
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses a configuration that still holds the examples' placeholder
    /// secrets (`CHANGE_ME` in a shard DSN, the admin token or the cluster
    /// secret, read from their files too): a node must not serve with
    /// credentials published in this repository. Checked by `serve`, not
    /// by [`Config::validate`], so the examples stay parseable.
    pub fn check_placeholders(&self) -> Result<(), ConfigError> {
        const MARK: &str = "CHANGE_ME";
        let mut found: Vec<String> = Vec::new();
        for s in &self.shards {
            if s.dsn.contains(MARK) {
                found.push(format!("shard {:?} dsn", s.name));
            }
        }
        if let Some(a) = &self.admin {
            if a.token().is_ok_and(|t| t.contains(MARK)) {
                found.push("[admin] token".into());
            }
        }
        if let Some(c) = &self.cluster {
            if c.secret().is_ok_and(|t| t.contains(MARK)) {
                found.push("[cluster] secret".into());
            }
        }
        if found.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(format!(
                "{} still hold{} the example value {MARK}: set real credentials before serving",
                found.join(", "),
                if found.len() == 1 { "s" } else { "" }
            )))
        }
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg = Config::parse(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "<string>".into(),
            source: Box::new(source),
        })
    }

    /// The `[[functions]]` modules, read from their files (text converted
    /// to binary), by name, in file order. Not compiled here: the node
    /// compiles them ([`Config::routing_snapshot`]).
    pub fn function_modules(&self) -> Result<Vec<(String, Vec<u8>)>, ConfigError> {
        let mut out: Vec<(String, Vec<u8>)> = Vec::with_capacity(self.functions.len());
        for f in &self.functions {
            if out.iter().any(|(n, _)| *n == f.name) {
                return Err(ConfigError::Invalid(format!(
                    "duplicate function name {:?}",
                    f.name
                )));
            }
            let wasm = crate::routing::functions::load_module(&f.name, &f.path)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            out.push((f.name.clone(), wasm));
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one [[shards]] entry is required".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.shards {
            if !names.insert(&s.name) {
                return Err(ConfigError::Invalid(format!(
                    "duplicate shard name {:?}",
                    s.name
                )));
            }
            let (dsn, _) = crate::tls::split_shard_dsn(&s.dsn)
                .map_err(|e| ConfigError::Invalid(format!("shard {:?}: bad dsn: {e}", s.name)))?;
            dsn.parse::<tokio_postgres::Config>()
                .map_err(|e| ConfigError::Invalid(format!("shard {:?}: bad dsn: {e}", s.name)))?;
        }
        if let Some(d) = &self.home_shard {
            if !names.contains(d) {
                return Err(ConfigError::Invalid(format!(
                    "home_shard {d:?} is not a shard"
                )));
            }
        }
        if self.pool_size == 0 {
            return Err(ConfigError::Invalid("pool_size must be at least 1".into()));
        }
        if self.max_pending_logins == 0 {
            return Err(ConfigError::Invalid(
                "max_pending_logins must be at least 1".into(),
            ));
        }
        let mut users = std::collections::HashSet::new();
        for u in &self.users {
            if !users.insert(&u.name) {
                return Err(ConfigError::Invalid(format!("duplicate user {:?}", u.name)));
            }
            match (u.auth, &u.password_hash) {
                (AuthMethod::Trust, _) => {}
                (AuthMethod::ScramSha256, Some(h)) => {
                    crate::frontend::auth::ScramVerifier::parse(h)
                        .map_err(|e| ConfigError::Invalid(format!("user {:?}: {e}", u.name)))?;
                }
                (AuthMethod::Md5, Some(h)) if h.len() == 35 && h.starts_with("md5") => {}
                (AuthMethod::Md5, Some(_)) => {
                    return Err(ConfigError::Invalid(format!(
                        "user {:?}: md5 password_hash must be 'md5' followed by 32 hex digits",
                        u.name
                    )))
                }
                (_, None) => {
                    return Err(ConfigError::Invalid(format!(
                        "user {:?}: password_hash is required for {:?} auth",
                        u.name, u.auth
                    )))
                }
            }
        }
        if let Some(c) = &self.cluster {
            if c.node_id == 0 {
                return Err(ConfigError::Invalid(
                    "[cluster] node_id must not be 0".into(),
                ));
            }
            c.listen.parse::<std::net::SocketAddr>().map_err(|e| {
                ConfigError::Invalid(format!("[cluster] listen {:?}: {e}", c.listen))
            })?;
            let mut ids = std::collections::HashSet::from([c.node_id]);
            for p in &c.peers {
                if !ids.insert(p.id) || p.id == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "[cluster] peer id {} is 0 or not unique",
                        p.id
                    )));
                }
            }
            if c.peers.is_empty() {
                return Err(ConfigError::Invalid(
                    "[cluster] needs at least one peer (a single node needs no [cluster])".into(),
                ));
            }
            if c.data_dir.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(
                    "[cluster] needs data_dir: a catalog replica must keep its log, promises and accepted entries on disk across restarts (a replica that forgets them can break consensus and lose catalog changes)".into(),
                ));
            }
            if c.lease_ms < 10 * c.tick_ms.max(1) {
                return Err(ConfigError::Invalid(
                    "[cluster] lease_ms must be at least 10 ticks".into(),
                ));
            }
            c.secret()?;
        }
        if self.tls_required && self.tls.is_none() {
            return Err(ConfigError::Invalid(
                "tls_required = true needs a [tls] section with cert and key: without a certificate no client could connect".into(),
            ));
        }
        if let Some(a) = &self.admin {
            a.listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| ConfigError::Invalid(format!("[admin] listen {:?}: {e}", a.listen)))?;
            a.token()?;
            if a.tls_cert.is_some() != a.tls_key.is_some() {
                return Err(ConfigError::Invalid(
                    "[admin] tls_cert and tls_key go together: set both for HTTPS, or neither"
                        .into(),
                ));
            }
        }
        self.snapshot()?;
        Ok(())
    }

    /// The initial routing snapshot (epoch 1) described by this file: shards
    /// in file order, tables, and `initial_ranges` equal ranges assigned
    /// round-robin. It only seeds a new catalog: the node's shard indexes
    /// are those of its shard table (`node::ShardTable`, built from the
    /// catalog, which grows at run time), never positions in `shards`.
    pub fn snapshot(&self) -> Result<RoutingSnapshot, ConfigError> {
        let bad = |e: &dyn std::fmt::Display| ConfigError::Invalid(e.to_string());
        let mut b = RoutingSnapshot::builder(1);
        let mut ids = Vec::new();
        for s in &self.shards {
            let id = ShardId::new(&s.name).map_err(|e| bad(&e))?;
            ids.push(id.clone());
            b = b.shard(id, s.dsn.clone());
        }
        let home = match &self.home_shard {
            Some(h) => ShardId::new(h).map_err(|e| bad(&e))?,
            None => ids[0].clone(),
        };
        b = b.home_shard(home);
        if let Some(t) = self
            .sharded_tables
            .iter()
            .find(|t| t.function.is_some() && t.seed != 0)
        {
            return Err(ConfigError::Invalid(format!(
                "sharded table {:?}: a seed applies to the built-in hash, not to function {:?}",
                t.name,
                t.function.as_deref().unwrap_or_default()
            )));
        }
        let modules = if self.sharded_tables.iter().any(|t| t.function.is_some()) {
            self.function_modules()?
        } else {
            Vec::new()
        };
        for t in &self.sharded_tables {
            let key_type: KeyType = t
                .key_type
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("sharded table {:?}: {e}", t.name)))?;
            let function = match &t.function {
                None => RoutingFunction::PgHash { seed: t.seed },
                Some(name) => match modules.iter().find(|(n, _)| n == name) {
                    Some((_, wasm)) => RoutingFunction::Wasm {
                        id: crate::routing::functions::module_id(wasm),
                    },
                    None => {
                        return Err(ConfigError::Invalid(format!(
                            "sharded table {:?}: no [[functions]] entry is named {name:?}",
                            t.name
                        )))
                    }
                },
            };
            b = b.sharded_table(ShardedTable {
                name: t.name.clone(),
                key_column: t.key.clone(),
                key_type,
                function,
            });
        }
        for r in &self.reference_tables {
            b = b.reference_table(r.clone());
        }
        let n = self.initial_ranges.unwrap_or(self.shards.len());
        b = b.equal_ranges(n).map_err(|e| bad(&e))?;
        b.build().map_err(|e| bad(&e))
    }

    /// This node's id: `[cluster] node_id` in a cluster, else `node_id`.
    pub fn effective_node_id(&self) -> u64 {
        self.cluster.as_ref().map_or(self.node_id, |c| c.node_id)
    }

    pub fn pool_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// `client_login_timeout_ms`, `None` when off.
    pub fn client_login_timeout(&self) -> Option<Duration> {
        nonzero_ms(self.client_login_timeout_ms)
    }
    /// `query_wait_timeout_ms`, `None` when off.
    pub fn query_wait_timeout(&self) -> Option<Duration> {
        nonzero_ms(self.query_wait_timeout_ms)
    }
    /// `server_lifetime_ms`, `None` when off.
    pub fn server_lifetime(&self) -> Option<Duration> {
        nonzero_ms(self.server_lifetime_ms)
    }
    /// `server_idle_timeout_ms`, `None` when off.
    pub fn server_idle_timeout(&self) -> Option<Duration> {
        nonzero_ms(self.server_idle_timeout_ms)
    }
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}

fn nonzero_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_and_rejects_bad() {
        let c = Config::from_toml(
            r#"
            [[shards]]
            name = "s0"
            dsn = "postgres://u:p@127.0.0.1:5432/db"
            [[users]]
            name = "app"
            auth = "trust"
            "#,
        )
        .expect("valid config");
        assert_eq!(c.pool_size, 20);
        assert_eq!(c.pool_mode, PoolMode::Transaction);
        assert!(!c.tls_required);
        assert!(Config::from_toml("shards = []").is_err());
        // tls_required without a certificate: no client could log in.
        let e = Config::from_toml(
            "tls_required = true\n[[shards]]\nname = \"s0\"\ndsn = \"host=127.0.0.1\"\n",
        )
        .expect_err("tls_required without [tls]")
        .to_string();
        assert!(
            e.contains("tls_required = true needs a [tls] section"),
            "{e}"
        );
        let e = Config::from_toml(
            r#"
            [[shards]]
            name = "s0"
            dsn = "host=127.0.0.1"
            [[users]]
            name = "app"
            auth = "scram-sha-256"
            "#,
        )
        .expect_err("missing hash");
        assert!(e.to_string().contains("password_hash is required"), "{e}");
        let e = Config::from_toml(
            r#"
            listen = "x"
            bogus = 1
            [[shards]]
            name = "s0"
            dsn = "host=127.0.0.1"
            "#,
        )
        .expect_err("unknown key");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn a_cluster_node_needs_a_data_dir() {
        let cluster = |data_dir: &str| {
            format!(
                "[[shards]]\nname = \"s0\"\ndsn = \"host=127.0.0.1\"\n\
                 [cluster]\nnode_id = 1\nlisten = \"127.0.0.1:7001\"\n\
                 secret = \"0123456789abcdef0123\"\n{data_dir}\
                 [[cluster.peers]]\nid = 2\naddr = \"127.0.0.1:7002\"\n"
            )
        };
        let e = Config::from_toml(&cluster("")).expect_err("no data_dir");
        assert!(e.to_string().contains("[cluster] needs data_dir"), "{e}");
        let e = Config::from_toml(&cluster("data_dir = \"\"\n")).expect_err("empty data_dir");
        assert!(e.to_string().contains("[cluster] needs data_dir"), "{e}");
        let c = Config::from_toml(&cluster("data_dir = \"/var/lib/hr\"\n")).expect("valid");
        assert_eq!(
            c.cluster.map(|c| c.data_dir),
            Some(PathBuf::from("/var/lib/hr"))
        );
    }
}

#[cfg(test)]
mod function_tests {
    use super::*;

    const BASE: &str = r#"
        [[shards]]
        name = "s0"
        dsn = "host=127.0.0.1"
    "#;

    #[test]
    fn tables_name_functions_whose_paths_are_relative_to_the_file() {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let dir = std::env::temp_dir().join(format!("hr-config-fn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("node.toml");
        let text = format!(
            "{BASE}\n[[functions]]\nname = \"tenant\"\npath = \"{}\"\n\
             [[sharded_tables]]\nname = \"docs\"\nkey = \"k\"\ntype = \"text\"\nfunction = \"tenant\"\n",
            "examples/functions/tenant_prefix.wat"
        );
        std::fs::write(&file, &text).expect("write");
        // relative to the file: the file is not next to the examples
        assert!(Config::load(&file).is_err());
        std::fs::write(examples.join(".hr-config-fn-test.toml"), &text).expect("write");
        let loaded = Config::load(&examples.join(".hr-config-fn-test.toml"));
        let _ = std::fs::remove_file(examples.join(".hr-config-fn-test.toml"));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = loaded.expect("valid");
        let snap = cfg.snapshot().expect("snapshot");
        let modules = cfg.function_modules().expect("modules");
        let id = crate::routing::functions::module_id(&modules[0].1);
        assert_eq!(
            snap.sharded_table("docs").map(|t| t.function),
            Some(RoutingFunction::Wasm { id })
        );
        // not compiled yet: the node attaches it
        assert_eq!(snap.unresolved_functions(), vec![id]);
    }

    #[test]
    fn bad_function_references_are_refused() {
        let table = "[[sharded_tables]]\nname = \"t\"\nkey = \"k\"\ntype = \"int8\"\n";
        let e = Config::from_toml(&format!("{BASE}\n{table}function = \"nope\"\n"))
            .expect_err("unknown function");
        assert!(e.to_string().contains("no [[functions]] entry"), "{e}");
        let e = Config::from_toml(&format!(
            "{BASE}\n[[functions]]\nname = \"f\"\npath = \"/nonexistent.wat\"\n{table}function = \"f\"\n"
        ))
        .expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent.wat"), "{e}");
        let e = Config::from_toml(&format!(
            "{BASE}\n[[functions]]\nname = \"f\"\npath = \"/nonexistent.wat\"\n{table}function = \"f\"\nseed = 3\n"
        ))
        .expect_err("seed and function");
        assert!(e.to_string().contains("seed"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../deploy/hotrepart.example.toml");
        let c =
            super::Config::from_toml(text).expect("deploy/hotrepart.example.toml must stay valid");
        let e = c
            .check_placeholders()
            .expect_err("the example's DSN password is a placeholder");
        assert!(e.to_string().contains("shard \"shard0\" dsn"), "{e}");
    }

    #[test]
    fn cluster_example_configs_are_valid() {
        for (name, text) in [
            ("node1", include_str!("../../deploy/cluster/node1.toml")),
            ("node2", include_str!("../../deploy/cluster/node2.toml")),
            ("node3", include_str!("../../deploy/cluster/node3.toml")),
        ] {
            let c = super::Config::from_toml(text)
                .unwrap_or_else(|e| panic!("deploy/cluster/{name}.toml: {e}"));
            let cl = c.cluster.as_ref().expect("[cluster]");
            assert_eq!(format!("node{}", cl.node_id), name);
            assert_eq!(cl.peers.len(), 2, "{name}");
            assert!(c.admin.is_some(), "{name}: [admin]");
            // Parseable, but refused by `serve` until the placeholders go.
            let e = c.check_placeholders().expect_err(name).to_string();
            assert!(
                e.contains("[admin] token")
                    && e.contains("[cluster] secret")
                    && e.contains("dsn")
                    && e.contains("CHANGE_ME"),
                "{name}: {e}"
            );
        }
    }
}
