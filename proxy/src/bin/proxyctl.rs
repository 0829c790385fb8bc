//! `proxyctl`: the admin CLI. Talks to one node's HTTP admin API (any node:
//! catalog changes reach the leader through the replicated log).
//!
//! For scripts: `jobs watch` and `--wait` draw a spinner only when stdout
//! is a terminal; otherwise they print a line per change of the job (JSON
//! lines with `--json`). A closed stdout (`| head -1`) ends proxyctl
//! quietly with status 0. Exit statuses are in [`EXIT_STATUS`].

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The exit statuses (printed by `--help`; also in README.md, "proxyctl in
/// scripts").
const EXIT_STATUS: &str = "\
Output: a table for people, the API's JSON with --json. `jobs watch` and
`--wait` draw a spinner on a terminal; when stdout is not a terminal they
print a line per change of the job instead (one JSON object per line with
--json), the last one with the phase the job ended in.

Exit status:
  0  success (also when stdout was closed early, e.g. `proxyctl range list | head -1`)
  1  the request failed: node unreachable, change refused (the message says why),
     or a followed job ended other than `done` (failed, aborted)
  2  wrong arguments; for `loadtest`: the check found a lost, duplicated or
     misplaced row";

#[derive(Parser)]
#[command(
    name = "proxyctl",
    version,
    about = "Administer a hotrepart cluster",
    after_help = EXIT_STATUS
)]
struct Cli {
    /// Admin API of any node, e.g. http://127.0.0.1:7432 (https://… when
    /// the node has [admin] tls_cert: then give --cacert).
    #[arg(long, env = "HOTREPART_ADMIN", default_value = "http://127.0.0.1:7432")]
    admin: String,
    /// PEM file of the CA (or the certificate itself) that signed the
    /// node's admin certificate: an https:// admin address is verified
    /// against it (chain and host name).
    #[arg(long, env = "HOTREPART_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// Admin token ([admin] token of the node); required by every
    /// command but `completions`.
    #[arg(long, env = "HOTREPART_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Nodes, leader, epoch and lease of the node asked.
    Status,
    /// Shards.
    Shard {
        #[command(subcommand)]
        cmd: ShardCmd,
    },
    /// Sharded and reference tables.
    Table {
        #[command(subcommand)]
        cmd: TableCmd,
    },
    /// WebAssembly routing functions (docs/WASM_ABI.md).
    Function {
        #[command(subcommand)]
        cmd: FunctionCmd,
    },
    /// Key ranges (metadata only; moving rows is `reshard`).
    Range {
        #[command(subcommand)]
        cmd: RangeCmd,
    },
    /// Move key ranges between shards, live (rows included).
    Reshard {
        #[command(subcommand)]
        cmd: ReshardCmd,
    },
    /// Reshard jobs: list, watch, abort.
    Jobs {
        #[command(subcommand)]
        cmd: Option<JobsCmd>,
    },
    /// Catalog cluster nodes: add or remove one (membership change).
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Verifying load generator: writes, updates and reads through the
    /// nodes, then checks every acknowledged write through the nodes and on
    /// every shard (exit status 2 when the check fails).
    Loadtest(hotrepart_proxy::tools::loadtest::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. `proxyctl completions bash >
    /// /etc/bash_completion.d/proxyctl`.
    Completions { shell: clap_complete::Shell },
    /// Fault injection for tests (the node must allow it).
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
}

#[derive(Subcommand)]
enum ReshardCmd {
    /// Move the range starting at LO, with its rows, to another shard.
    Move {
        lo: u64,
        #[arg(long)]
        to: String,
        /// Follow the job until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Split the range starting at LO (at its middle, or --at); with --to,
    /// move the upper half there.
    Split {
        lo: u64,
        #[arg(long)]
        at: Option<u64>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// Add a shard: its schema and reference tables are copied; with
    /// --rebalance, rows move onto it (ranges split where needed) until it
    /// holds about its share of the rows (1 / number of shards).
    AddShard {
        name: String,
        #[arg(long)]
        dsn: String,
        #[arg(long)]
        rebalance: bool,
        /// Print the moves --rebalance would make (range, from, to,
        /// estimated rows) and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        wait: bool,
    },
    /// Move every range of a shard to the others (largest first, each to
    /// the shard with the fewest rows).
    Drain {
        shard: String,
        /// Print the moves and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum JobsCmd {
    /// List jobs (the default).
    List,
    /// Follow a job with a progress display until it ends.
    Watch { id: String },
    /// Abort a job before its flip: the source stays as it was.
    Abort { id: String },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Cut the node off from its peers (on) or reconnect it (off).
    Partition {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Add a node to the catalog cluster. Start it first with
    /// `[cluster] join = true` and `peers` naming current members; it gets
    /// the whole catalog once added.
    Add {
        id: u64,
        /// Its `[cluster] listen` address (HOST:PORT).
        #[arg(long)]
        addr: String,
        /// Its admin API base URL.
        #[arg(long = "admin")]
        admin_url: Option<String>,
    },
    /// Remove a node from the catalog cluster (it stops routing once its
    /// lease lapses).
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum ShardCmd {
    /// Add a shard (the node checks it can connect first).
    Add { name: String, dsn: String },
    /// List shards.
    List,
    /// Remove a shard that owns no range.
    Remove { name: String },
}

#[derive(Subcommand)]
enum TableCmd {
    /// Declare a sharded table (it must be empty on every shard).
    Shard {
        table: String,
        #[arg(long)]
        key: String,
        /// int2, int4, int8, text or uuid.
        #[arg(long = "type")]
        key_type: String,
        /// Seed of the PostgreSQL hash (default 0).
        #[arg(long, conflicts_with = "function")]
        seed: Option<u64>,
        /// Place rows with this uploaded WebAssembly routing function
        /// instead of the PostgreSQL hash.
        #[arg(long)]
        function: Option<String>,
    },
    /// Declare a reference table (a copy on every shard).
    Reference { table: String },
    /// List declared tables.
    List,
}

#[derive(Subcommand)]
enum FunctionCmd {
    /// Upload a routing function (a .wasm binary or .wat text); the node
    /// validates it before it enters the catalog.
    Upload {
        name: String,
        file: std::path::PathBuf,
    },
    /// List routing functions and the tables using them.
    List,
    /// Remove a routing function no table uses.
    Remove { name: String },
    /// Make a function the routing function of an empty sharded table.
    Attach { table: String, function: String },
}

#[derive(Subcommand)]
enum RangeCmd {
    /// List key ranges.
    List,
    /// Split the range starting at LO (at its middle, or at --at).
    Split {
        lo: u64,
        #[arg(long)]
        at: Option<u64>,
    },
    /// Give an empty range to another shard (refused if it holds rows).
    Assign {
        lo: u64,
        #[arg(long)]
        to: String,
    },
    /// Thaw a range left frozen by a request whose node died (a live
    /// reshard job's freeze is refused: abort the job instead).
    Unfreeze { lo: u64 },
}

struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.base.trim_end_matches('/'), path);
        let auth = format!("Bearer {}", self.token);
        let res = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            (_, b) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b.unwrap_or(json!({}))),
        };
        let mut res = res.with_context(|| format!("cannot reach the admin API at {url}"))?;
        let status = res.status();
        let text = res.body_mut().read_to_string()?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{url} answered {status} with non-JSON: {text}"))?;
        if !status.is_success() {
            let msg = v["error"].as_str().unwrap_or(&text).to_string();
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(v)
    }
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        // Written whole, so that a closed pipe (`| head`) is no error.
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "proxyctl", &mut script);
        let mut out = std::io::stdout();
        let _ = out.write_all(&script).and_then(|()| out.flush());
        std::process::exit(0);
    }
    if cli.token.is_none() {
        <Cli as clap::CommandFactory>::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "the admin token is required: --token or HOTREPART_TOKEN",
            )
            .exit();
    }
    if let Err(e) = run(cli) {
        if broken_pipe(&e) {
            // The reader is gone (`| head -1`): nothing left to say.
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "proxyctl: {e:#}");
        std::process::exit(1);
    }
}

/// Whether `e` comes from writing to a closed pipe.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.admin.starts_with("https://") && cli.cacert.is_none() {
        bail!(
            "{} is https: give the CA that signed the node's admin certificate with --cacert or HOTREPART_CACERT",
            cli.admin
        );
    }
    let agent = hotrepart_proxy::tls::http_agent(Duration::from_secs(60), cli.cacert.as_deref())?;
    let api = Api {
        base: cli.admin.clone(),
        token: cli.token.clone().unwrap_or_default(),
        agent,
    };
    let (v, show): (Value, fn(&Value) -> String) = match cli.cmd {
        Cmd::Status => (api.call("GET", "/v1/status", None)?, show_status),
        Cmd::Node { cmd } => match cmd {
            NodeCmd::Add {
                id,
                addr,
                admin_url,
            } => (
                api.call(
                    "POST",
                    "/v1/nodes",
                    Some(json!({ "id": id, "addr": addr, "admin": admin_url })),
                )?,
                show_membership,
            ),
            NodeCmd::Remove { id } => (
                api.call("DELETE", &format!("/v1/nodes/{id}"), None)?,
                show_membership,
            ),
        },
        Cmd::Shard { cmd } => match cmd {
            ShardCmd::Add { name, dsn } => (
                api.call(
                    "POST",
                    "/v1/shards",
                    Some(json!({ "name": name, "dsn": dsn })),
                )?,
                show_epoch,
            ),
            ShardCmd::List => (api.call("GET", "/v1/shards", None)?, show_shards),
            ShardCmd::Remove { name } => (
                api.call("DELETE", &format!("/v1/shards/{name}"), None)?,
                show_epoch,
            ),
        },
        Cmd::Table { cmd } => match cmd {
            TableCmd::Shard {
                table,
                key,
                key_type,
                seed,
                function,
            } => (
                api.call(
                    "POST",
                    "/v1/tables",
                    Some(
                        json!({ "table": table, "kind": "sharded", "key_column": key,
                                 "key_type": key_type, "seed": seed, "function": function }),
                    ),
                )?,
                show_epoch,
            ),
            TableCmd::Reference { table } => (
                api.call(
                    "POST",
                    "/v1/tables",
                    Some(json!({ "table": table, "kind": "reference" })),
                )?,
                show_epoch,
            ),
            TableCmd::List => (api.call("GET", "/v1/tables", None)?, show_tables),
        },
        Cmd::Function { cmd } => match cmd {
            FunctionCmd::Upload { name, file } => {
                let bytes = std::fs::read(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                (
                    api.call(
                        "POST",
                        "/v1/functions",
                        Some(json!({ "name": name, "module_hex": hex(&bytes) })),
                    )?,
                    show_upload,
                )
            }
            FunctionCmd::List => (api.call("GET", "/v1/functions", None)?, show_functions),
            FunctionCmd::Remove { name } => (
                api.call("DELETE", &format!("/v1/functions/{name}"), None)?,
                |v| format!("removed function {}", s(&v["removed"])),
            ),
            FunctionCmd::Attach { table, function } => (
                api.call(
                    "POST",
                    &format!("/v1/tables/{table}/function"),
                    Some(json!({ "function": function })),
                )?,
                show_epoch,
            ),
        },
        Cmd::Range { cmd } => match cmd {
            RangeCmd::List => (api.call("GET", "/v1/ranges", None)?, show_ranges),
            RangeCmd::Split { lo, at } => (
                api.call(
                    "POST",
                    "/v1/ranges/split",
                    Some(json!({ "lo": lo, "at": at })),
                )?,
                show_epoch,
            ),
            RangeCmd::Assign { lo, to } => (
                api.call(
                    "POST",
                    "/v1/ranges/assign",
                    Some(json!({ "lo": lo, "to": to })),
                )?,
                show_epoch,
            ),
            RangeCmd::Unfreeze { lo } => (
                api.call("POST", "/v1/ranges/unfreeze", Some(json!({ "lo": lo })))?,
                show_epoch,
            ),
        },
        Cmd::Reshard { cmd } => {
            let (v, wait) = match cmd {
                ReshardCmd::Move { lo, to, wait } => (
                    api.call(
                        "POST",
                        "/v1/reshard/move",
                        Some(json!({ "lo": lo, "to": to })),
                    )?,
                    wait,
                ),
                ReshardCmd::Split { lo, at, to, wait } => (
                    api.call(
                        "POST",
                        "/v1/reshard/split",
                        Some(json!({ "lo": lo, "at": at, "to": to })),
                    )?,
                    wait,
                ),
                ReshardCmd::AddShard {
                    name,
                    dsn,
                    rebalance,
                    dry_run,
                    wait,
                } => (
                    api.call(
                        "POST",
                        "/v1/reshard/add-shard",
                        Some(
                            json!({ "name": name, "dsn": dsn, "rebalance": rebalance, "dry_run": dry_run }),
                        ),
                    )?,
                    wait && !dry_run,
                ),
                ReshardCmd::Drain {
                    shard,
                    dry_run,
                    wait,
                } => (
                    api.call(
                        "POST",
                        "/v1/reshard/drain",
                        Some(json!({ "shard": shard, "dry_run": dry_run })),
                    )?,
                    wait && !dry_run,
                ),
            };
            if let (true, Some(id)) = (wait, v["job"].as_str()) {
                return watch(&api, id, cli.json);
            }
            if let (true, Some(list)) = (wait, v["jobs"].as_array()) {
                for id in list.iter().filter_map(|j| j.as_str()) {
                    watch(&api, id, cli.json)?;
                }
                return Ok(());
            }
            (v, |v: &Value| {
                let plan = show_plan(v);
                match (v["job"].as_str(), v["jobs"].as_array()) {
                    (Some(id), _) => {
                        format!("job {id} started; follow it with `proxyctl jobs watch {id}`")
                    }
                    (None, Some(list)) => format!(
                        "{plan}{} job(s) started: {}; see `proxyctl jobs`",
                        list.len(),
                        list.iter().map(s).collect::<Vec<_>>().join(", ")
                    ),
                    _ if v["dry_run"] == json!(true) => {
                        format!("{plan}dry run: nothing was changed")
                    }
                    _ => format!("ok {v}"),
                }
            })
        }
        Cmd::Jobs { cmd } => match cmd.unwrap_or(JobsCmd::List) {
            JobsCmd::List => (api.call("GET", "/v1/jobs", None)?, show_jobs),
            JobsCmd::Watch { id } => return watch(&api, &id, cli.json),
            JobsCmd::Abort { id } => (
                api.call("POST", &format!("/v1/jobs/{id}/abort"), None)?,
                |v| format!("job {} is aborting", s(&v["job"])),
            ),
        },
        Cmd::Loadtest(args) => {
            let mut out = std::io::stdout();
            let ok = hotrepart_proxy::tools::loadtest::cli(
                args, &cli.admin, &api.token, cli.json, &mut out,
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            if !ok {
                std::process::exit(2);
            }
            return Ok(());
        }
        // Answered by `main` before any request.
        Cmd::Completions { .. } => return Ok(()),
        Cmd::Debug {
            cmd: DebugCmd::Partition { state },
        } => (
            api.call(
                "POST",
                "/v1/debug/partition",
                Some(json!({ "on": state == "on" })),
            )?,
            |v| v.to_string(),
        ),
    };
    let text = if cli.json {
        serde_json::to_string_pretty(&v)?
    } else {
        show(&v)
    };
    writeln!(std::io::stdout(), "{}", text.trim_end())?;
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

fn show_upload(v: &Value) -> String {
    format!(
        "{} function {} (id {}, {} bytes)",
        if v["changed"] == json!(false) {
            "unchanged:"
        } else {
            "stored"
        },
        s(&v["name"]),
        s(&v["id"]),
        s(&v["size"]),
    )
}

fn show_functions(v: &Value) -> String {
    let rows = v["functions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let id = s(&x["id"]);
                    let tables: Vec<String> = x["tables"]
                        .as_array()
                        .map(|t| t.iter().map(s).collect())
                        .unwrap_or_default();
                    vec![
                        s(&x["name"]),
                        id.get(..16).unwrap_or(&id).to_string(),
                        s(&x["size"]),
                        if tables.is_empty() {
                            "-".into()
                        } else {
                            tables.join(",")
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["FUNCTION", "ID", "BYTES", "TABLES"], rows)
}

fn show_epoch(v: &Value) -> String {
    match v.get("epoch") {
        Some(e) => format!("ok, catalog epoch {e}"),
        None => format!("ok {v}"),
    }
}

fn show_status(v: &Value) -> String {
    let c = &v["cluster"];
    let mut out = format!(
        "node {}  epoch {}  ready {}  lease {}  leader {}  clients {}  shards {}  ranges {}",
        s(&c["node_id"]),
        s(&v["epoch"]),
        s(&v["ready"]),
        if v["lease_valid"] == json!(true) {
            "valid"
        } else {
            "EXPIRED"
        },
        s(&c["leader"]),
        s(&v["clients"]),
        s(&v["shards"]),
        s(&v["ranges"]),
    );
    if c["config_id"].as_u64().is_some() {
        out.push_str(&format!(
            "\nconfiguration {}  members {}  this node {}",
            s(&c["config_id"]),
            c["members"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            if c["member"] == json!(true) {
                "is a member"
            } else {
                "is NOT a member"
            },
        ));
    }
    if let Some(peers) = c["peers"].as_array() {
        let rows = peers
            .iter()
            .map(|p| {
                vec![
                    s(&p["id"]),
                    s(&p["addr"]),
                    s(&p["connected"]),
                    s(&p["applied"]),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(&["PEER", "ADDR", "CONNECTED", "APPLIED"], rows));
    }
    if let Some(tasks) = v["tasks"].as_array() {
        let rows = tasks
            .iter()
            .map(|t| {
                vec![
                    s(&t["name"]),
                    s(&t["state"]).to_uppercase(),
                    s(&t["restarts"]),
                    since(&t["since_ms"]),
                    s(&t["last_error"]),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["TASK", "STATE", "RESTARTS", "SINCE", "LAST ERROR"],
            rows,
        ));
    }
    out
}

/// How long ago a time in milliseconds since the Unix epoch was.
fn since(ms: &Value) -> String {
    let Some(ms) = ms.as_u64() else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// The rows per shard and the moves of a rebalance or drain plan (empty
/// when the answer has none).
fn show_plan(v: &Value) -> String {
    let Some(moves) = v["moves"].as_array() else {
        return String::new();
    };
    let mut out = String::new();
    if let Some(rows) = v["rows"].as_object() {
        let per: Vec<String> = rows.iter().map(|(k, n)| format!("{k} {}", s(n))).collect();
        out.push_str(&format!(
            "rows now: {} (total {}, share per shard {}; by {})\n",
            per.join(", "),
            s(&v["total_rows"]),
            s(&v["share"]),
            s(&v["basis"]).replace('_', " "),
        ));
    }
    if moves.is_empty() {
        out.push_str("no move needed\n");
        return out;
    }
    let span = |lo: &Value, hi: &Value| {
        format!(
            "[{}, {})",
            s(lo),
            if hi.is_null() { "2^64".into() } else { s(hi) }
        )
    };
    let rows = moves
        .iter()
        .map(|m| {
            vec![
                span(&m["lo"], &m["hi"]),
                s(&m["from"]),
                s(&m["to"]),
                s(&m["rows"]),
                if m["split_of"].is_null() {
                    "-".into()
                } else {
                    format!(
                        "split from {}",
                        span(&m["split_of"]["lo"], &m["split_of"]["hi"])
                    )
                },
            ]
        })
        .collect();
    out.push_str(&table(&["RANGE", "FROM", "TO", "EST. ROWS", "SPLIT"], rows));
    out.push('\n');
    out
}

fn show_membership(v: &Value) -> String {
    let rows = v["members"]
        .as_array()
        .map(|a| a.iter().map(|m| vec![s(&m["id"]), s(&m["addr"])]).collect())
        .unwrap_or_default();
    format!(
        "configuration {}\n{}",
        s(&v["config_id"]),
        table(&["NODE", "ADDR"], rows)
    )
}

fn show_shards(v: &Value) -> String {
    let rows = v["shards"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["name"]),
                        if x["home"] == json!(true) { "home" } else { "" }.into(),
                        s(&x["read_ranges"]),
                        s(&x["write_ranges"]),
                        s(&x["dsn"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["SHARD", "", "READ", "WRITE", "DSN"], rows)
}

fn show_tables(v: &Value) -> String {
    let mut rows: Vec<Vec<String>> = v["sharded"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["table"]),
                        "sharded".into(),
                        s(&x["key_column"]),
                        s(&x["key_type"]),
                        match x["function_name"].as_str() {
                            Some(name) => format!("{name} ({})", s(&x["function"])),
                            None => s(&x["function"]),
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(a) = v["reference"].as_array() {
        for x in a {
            rows.push(vec![
                s(x),
                "reference".into(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
    }
    format!(
        "{}\n(undeclared tables live on {})",
        table(&["TABLE", "KIND", "KEY", "TYPE", "FUNCTION"], rows),
        s(&v["home_shard"])
    )
}

fn show_ranges(v: &Value) -> String {
    let rows = v["ranges"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let hi = if x["hi"].is_null() {
                        "2^64".to_string()
                    } else {
                        s(&x["hi"])
                    };
                    vec![
                        s(&x["lo"]),
                        hi,
                        s(&x["read_owner"]),
                        s(&x["write_owner"]),
                        s(&x["status"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "epoch {}\n{}",
        s(&v["epoch"]),
        table(&["LO", "HI", "READ", "WRITE", "STATUS"], rows)
    )
}

fn show_jobs(v: &Value) -> String {
    let rows = v["jobs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|j| {
                    vec![
                        s(&j["job"]),
                        s(&j["phase"]),
                        format!(
                            "[{}, {})",
                            s(&j["lo"]),
                            if j["hi"].is_null() {
                                "2^64".into()
                            } else {
                                s(&j["hi"])
                            }
                        ),
                        format!("{} -> {}", s(&j["from"]), s(&j["to"])),
                        s(&j["rows_copied"]),
                        s(&j["lag_bytes"]),
                        s(&j["note"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["JOB", "PHASE", "RANGE", "MOVE", "ROWS", "LAG", "NOTE"],
        rows,
    )
}

/// Follows job `id` until it ends; fails unless it ends Done. On a
/// terminal (and without `--json`) a spinner; otherwise a line on stdout
/// per change (phase or note at once, progress at most once a second),
/// the final state always.
fn watch(api: &Api, id: &str, json: bool) -> anyhow::Result<()> {
    let tty = !json && std::io::stdout().is_terminal();
    let bar = if tty {
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stdout());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(24 * 3600);
    let mut printed: Option<(Value, Instant)> = None;
    loop {
        let v = api.call("GET", &format!("/v1/jobs/{id}"), None)?;
        let done = v["done"] == json!(true);
        let msg = format!(
            "job {id}: {}  rows copied {}  lag {} B  {}",
            s(&v["phase"]),
            s(&v["rows_copied"]),
            s(&v["lag_bytes"]),
            s(&v["note"])
        );
        if tty {
            bar.set_message(msg);
            bar.tick();
        } else {
            let key = json!([v["phase"], v["note"], v["rows_copied"], v["lag_bytes"]]);
            let due = match &printed {
                None => true,
                Some((k, at)) => {
                    k[0] != key[0]
                        || k[1] != key[1]
                        || (k != &key && at.elapsed() >= Duration::from_secs(1))
                        || done
                }
            };
            if due {
                let mut out = std::io::stdout().lock();
                if json {
                    writeln!(out, "{}", serde_json::to_string(&v)?)?;
                } else {
                    writeln!(
                        out,
                        "{}  ({:.1} s)",
                        msg.trim_end(),
                        start.elapsed().as_secs_f64()
                    )?;
                }
                out.flush()?;
                printed = Some((key, Instant::now()));
            }
        }
        if done {
            bar.finish();
            let phase = s(&v["phase"]);
            if phase != "done" {
                bail!("job {id} ended {phase}: {}", s(&v["note"]));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("job {id} did not end within a day");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
