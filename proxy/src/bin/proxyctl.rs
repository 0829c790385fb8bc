//! `proxyctl`: the admin CLI. Talks to one node's HTTP admin API (any node:
//! catalog changes reach the leader through the replicated log).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "proxyctl", version, about = "Administer a hotrepart cluster")]
struct Cli {
    /// Admin API of any node, e.g. http://127.0.0.1:7432.
    #[arg(long, env = "HOTREPART_ADMIN", default_value = "http://127.0.0.1:7432")]
    admin: String,
    /// Admin token ([admin] token of the node).
    #[arg(long, env = "HOTREPART_TOKEN", hide_env_values = true)]
    token: String,
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
    /// Key ranges (metadata only; moving rows is `reshard`).
    Range {
        #[command(subcommand)]
        cmd: RangeCmd,
    },
    /// Verifying load generator: writes, updates and reads through the
    /// nodes, then checks every acknowledged write through the nodes and on
    /// every shard (exit status 2 when the check fails).
    Loadtest(hotrepart_proxy::loadtest::Args),
    /// Fault injection for tests (the node must allow it).
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
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
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Declare a reference table (a copy on every shard).
    Reference { table: String },
    /// List declared tables.
    List,
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
    /// Thaw a range left frozen by a job or request whose node died.
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
    if let Err(e) = run(cli) {
        let _ = writeln!(std::io::stderr(), "proxyctl: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build();
    let api = Api {
        base: cli.admin.clone(),
        token: cli.token.clone(),
        agent: ureq::Agent::new_with_config(config),
    };
    let (v, show): (Value, fn(&Value) -> String) = match cli.cmd {
        Cmd::Status => (api.call("GET", "/v1/status", None)?, show_status),
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
            } => (
                api.call(
                    "POST",
                    "/v1/tables",
                    Some(
                        json!({ "table": table, "kind": "sharded", "key_column": key,
                                 "key_type": key_type, "seed": seed }),
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
        Cmd::Loadtest(args) => {
            let mut out = std::io::stdout();
            let ok =
                hotrepart_proxy::loadtest::cli(args, &cli.admin, &cli.token, cli.json, &mut out)
                    .map_err(|e| anyhow::anyhow!(e))?;
            if !ok {
                std::process::exit(2);
            }
            return Ok(());
        }
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
    out
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
                        s(&x["function"]),
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
