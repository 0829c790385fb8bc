//! `hotrepart demo`: the whole product on one machine, in the foreground.
//!
//! By default: 3 nodes in this one process replicating the routing catalog
//! with Paxos (`[cluster]`, random secret), each with its client port and
//! its admin API (one random token per run); N local PostgreSQL shards in
//! the catalog plus spare servers outside it (to add with `proxyctl reshard
//! add-shard`); a sample schema with rows: `accounts`, sharded by the
//! built-in PostgreSQL hash of `id`, and `orders`, placed by the example
//! WebAssembly function `deploy/examples/functions/tenant_prefix.wat`
//! (built into the binary), which keeps one tenant's orders on one shard.
//! With `--nodes 1` a single node with a local catalog.
//!
//! What it prints on stdout, after the servers are up and the rows are in
//! (the test `demo::` parses it): `ready: <DSN of node 1>`, a `psql` line
//! per node, the two `export HOTREPART_…` lines of `proxyctl`, commands to
//! try; lines starting with `#` are comments. Ctrl-C or SIGTERM stops the
//! nodes, then every PostgreSQL server it started. Every run starts from
//! empty data directories.

use crate::config::Config;
use crate::node::Node;
use crate::tools::localpg::{free_port, LocalPg, LocalPgError, PgInstall};
use hotrepart_routing_paxos::CatalogHandle;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Demo client credentials (loopback only).
pub const DEMO_USER: &str = "app";
pub const DEMO_PASSWORD: &str = "app";

/// The example routing function of the `orders` table.
const TENANT_PREFIX_WAT: &[u8] =
    include_bytes!("../../../deploy/examples/functions/tenant_prefix.wat");

/// Rows of the sample tables.
pub const ACCOUNTS_ROWS: usize = 1000;
pub const TENANTS: &[&str] = &["acme", "globex", "initech", "umbrella", "hooli"];
pub const ORDERS_PER_TENANT: usize = 40;

/// How long the nodes may take to elect a leader and publish the catalog.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Pg(#[from] LocalPgError),
    #[error("{0}")]
    Other(String),
}

fn other(what: &str) -> impl FnOnce(&dyn std::fmt::Display) -> DemoError + '_ {
    move |e| DemoError::Other(format!("{what}: {e}"))
}

/// What to start.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Nodes (1: a single node with a local catalog; more: a `[cluster]`).
    pub nodes: usize,
    /// Shards in the catalog.
    pub shards: usize,
    /// PostgreSQL servers started but not in the catalog.
    pub spare: usize,
    /// Client port of node 1 (node i gets port + i - 1); 0: free ports.
    pub port: u16,
    /// Admin port of node 1 (likewise); 0: free ports.
    pub admin_port: u16,
    /// Where the servers and the catalog journals live (emptied first).
    pub data_dir: PathBuf,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            nodes: 3,
            shards: 2,
            spare: 1,
            port: 6432,
            admin_port: 7432,
            data_dir: std::env::temp_dir().join("hotrepart-demo"),
        }
    }
}

/// A running demo's PostgreSQL servers (stopped when dropped).
pub struct Servers {
    /// In the catalog, named `shard0…`.
    pub shards: Vec<LocalPg>,
    /// Spare servers, named `shard<N>…` when added.
    pub spare: Vec<LocalPg>,
}

/// Starts `shards + spare` PostgreSQL servers under `data_dir` (one initdb,
/// copied).
pub fn start_servers(shards: usize, spare: usize, data_dir: &Path) -> Result<Servers, DemoError> {
    if shards == 0 {
        return Err(DemoError::Other("--shards must be at least 1".into()));
    }
    let install = PgInstall::find()?;
    let password = format!("pw{:016x}", rand::random::<u64>());
    let template = data_dir.join("initdb-template");
    let mut all = Vec::new();
    for i in 0..shards + spare {
        let port = free_port().map_err(|e| other("no free port")(&e))?;
        all.push(LocalPg::start(
            &install,
            &data_dir.join(format!("shard{i}")),
            port,
            &password,
            Some(&template),
        )?);
    }
    let spare = all.split_off(shards);
    Ok(Servers { shards: all, spare })
}

/// One node's addresses.
#[derive(Debug, Clone)]
struct NodePorts {
    port: u16,
    admin: u16,
    peer: u16,
}

fn port_of(base: u16, i: usize) -> Result<u16, DemoError> {
    if base == 0 {
        return free_port().map_err(|e| other("no free port")(&e));
    }
    u16::try_from(usize::from(base) + i)
        .map_err(|_| DemoError::Other(format!("port {base} + {i} is out of range")))
}

/// The configuration of node `i` (0-based).
fn node_config(
    i: usize,
    ports: &[NodePorts],
    servers: &Servers,
    function: &Path,
    token: &str,
    secret: &str,
    data_dir: &Path,
) -> Result<Config, DemoError> {
    let p = &ports[i];
    let mut t = format!(
        "listen = \"127.0.0.1:{}\"\npool_size = 20\nadmin_users = [\"{DEMO_USER}\"]\n",
        p.port
    );
    for (j, s) in servers.shards.iter().enumerate() {
        t.push_str(&format!(
            "[[shards]]\nname = \"shard{j}\"\ndsn = \"{}\"\n",
            s.dsn()
        ));
    }
    t.push_str(&format!(
        "[[functions]]\nname = \"tenant_prefix\"\npath = {:?}\n",
        function.display().to_string()
    ));
    t.push_str(
        "[[sharded_tables]]\nname = \"accounts\"\nkey = \"id\"\ntype = \"int8\"\n\
         [[sharded_tables]]\nname = \"orders\"\nkey = \"id\"\ntype = \"text\"\nfunction = \"tenant_prefix\"\n",
    );
    t.push_str(&format!(
        "[[users]]\nname = \"{DEMO_USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n",
        crate::frontend::auth::scram_verifier(DEMO_PASSWORD)
    ));
    t.push_str(&format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\ntoken = \"{token}\"\n",
        p.admin
    ));
    if ports.len() > 1 {
        t.push_str(&format!(
            "[cluster]\nnode_id = {}\nlisten = \"127.0.0.1:{}\"\nsecret = \"{secret}\"\ndata_dir = {:?}\n",
            i + 1,
            p.peer,
            data_dir.join(format!("node{}", i + 1)).display().to_string()
        ));
        for (j, q) in ports.iter().enumerate().filter(|(j, _)| *j != i) {
            t.push_str(&format!(
                "[[cluster.peers]]\nid = {}\naddr = \"127.0.0.1:{}\"\nadmin = \"http://127.0.0.1:{}\"\n",
                j + 1,
                q.peer,
                q.admin
            ));
        }
    }
    Config::from_toml(&t).map_err(|e| other("demo configuration")(&e))
}

/// One running node of the demo.
struct DemoNode {
    node: Arc<Node>,
    catalog: CatalogHandle,
    port: u16,
    admin: u16,
}

async fn start_node(cfg: Config) -> Result<DemoNode, DemoError> {
    let catalog = crate::control::cluster::start_catalog(&cfg)
        .await
        .map_err(|e| other("cannot start the routing catalog")(&e))?;
    let node = Node::with_catalog(cfg.clone(), catalog.clone())
        .map_err(|e| other("cannot start a node")(&e))?;
    let listener = node.bind().await.map_err(|e| other("listen")(&e))?;
    let port = listener
        .local_addr()
        .map_err(|e| other("listen")(&e))?
        .port();
    let (listen, token) = match &cfg.admin {
        Some(a) => (a.listen.clone(), a.token().map_err(|e| other("token")(&e))?),
        None => {
            return Err(DemoError::Other(
                "the demo configuration has no [admin]".into(),
            ))
        }
    };
    let admin = crate::control::admin::serve(node.clone(), &listen, token, false)
        .await
        .map_err(|e| other(&format!("cannot listen on {listen}"))(&e))?
        .port();
    node.start(listener);
    Ok(DemoNode {
        node,
        catalog,
        port,
        admin,
    })
}

/// Waits until every node has the catalog, a valid lease and (in a
/// cluster) knows a leader.
async fn wait_ready(nodes: &[DemoNode]) -> Result<(), DemoError> {
    let start = Instant::now();
    loop {
        let ready = nodes.iter().all(|n| {
            n.node.routing.catalog_ready()
                && n.catalog.lease_valid()
                && (nodes.len() == 1 || n.catalog.status().leader.is_some())
        });
        if ready {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(DemoError::Other(format!(
                "the nodes did not agree on a catalog leader within {READY_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The client DSN of a node.
pub fn node_dsn(port: u16) -> String {
    format!("postgres://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{port}/postgres")
}

/// Creates the sample tables through the node at `port` (DDL goes to every
/// shard) and loads their rows (multi-row INSERTs, split by shard).
async fn load_sample(port: u16) -> Result<(), DemoError> {
    let (db, conn) = tokio_postgres::connect(&node_dsn(port), tokio_postgres::NoTls)
        .await
        .map_err(|e| other("connect to node 1")(&e))?;
    let conn = tokio::spawn(conn);
    let accounts: Vec<String> = (1..=ACCOUNTS_ROWS)
        .map(|i| format!("({i}, 'owner-{i}', {}.00)", (i * 37) % 1000))
        .collect();
    let orders: Vec<String> = TENANTS
        .iter()
        .flat_map(|t| {
            (1..=ORDERS_PER_TENANT).map(move |i| format!("('{t}:{i}', '{t}', {})", i * 10))
        })
        .collect();
    let statements = [
        "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL)".to_string(),
        "CREATE TABLE orders (id text PRIMARY KEY, tenant text NOT NULL, amount int NOT NULL)".to_string(),
        format!("INSERT INTO accounts (id, owner, balance) VALUES {}", accounts.join(",")),
        format!("INSERT INTO orders (id, tenant, amount) VALUES {}", orders.join(",")),
    ];
    let mut r = Ok(());
    for sql in &statements {
        r = db.batch_execute(sql).await;
        if r.is_err() {
            break;
        }
    }
    drop(db);
    let _ = conn.await;
    r.map_err(|e| match e.as_db_error() {
        Some(d) => DemoError::Other(format!(
            "loading the sample schema: {} (SQLSTATE {})",
            d.message(),
            d.code().code()
        )),
        None => other("loading the sample schema")(&e),
    })
}

/// Runs the demo until Ctrl-C or SIGTERM. `announce` receives each line
/// to print (the first is `ready: …`).
pub async fn run(opts: DemoOptions, mut announce: impl FnMut(String)) -> Result<(), DemoError> {
    if opts.nodes == 0 {
        return Err(DemoError::Other("--nodes must be at least 1".into()));
    }
    let dir = opts.data_dir.clone();
    // Every run starts afresh: servers, template (it holds the superuser
    // password of its run) and catalog journals.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| other(&dir.display().to_string())(&e))?;
    let (shards, spare) = (opts.shards, opts.spare);
    let d = dir.clone();
    let servers = tokio::task::spawn_blocking(move || start_servers(shards, spare, &d))
        .await
        .map_err(|e| other("starting the shards")(&e))??;
    let function = dir.join("tenant_prefix.wat");
    std::fs::write(&function, TENANT_PREFIX_WAT)
        .map_err(|e| other(&function.display().to_string())(&e))?;
    let token = format!(
        "demo-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let secret = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let mut ports = Vec::new();
    for i in 0..opts.nodes {
        ports.push(NodePorts {
            port: port_of(opts.port, i)?,
            admin: port_of(opts.admin_port, i)?,
            peer: free_port().map_err(|e| other("no free port")(&e))?,
        });
    }
    let mut nodes = Vec::new();
    let started = async {
        for i in 0..opts.nodes {
            let cfg = node_config(i, &ports, &servers, &function, &token, &secret, &dir)?;
            nodes.push(start_node(cfg).await?);
        }
        wait_ready(&nodes).await?;
        load_sample(nodes[0].port).await
    }
    .await;
    if let Err(e) = started {
        stop(nodes).await;
        return Err(e);
    }

    announce(format!("ready: {}", node_dsn(nodes[0].port)));
    for (i, n) in nodes.iter().enumerate() {
        announce(format!("psql '{}'    # node {}", node_dsn(n.port), i + 1));
    }
    announce(format!(
        "# admin console (SHOW HELP, SHOW POOLS, SHOW SHARDS, SHOW RANGES): psql '{}'",
        node_dsn(nodes[0].port).replace("/postgres", "/hotrepart")
    ));
    announce(format!(
        "# sample tables: accounts ({ACCOUNTS_ROWS} rows, sharded by the PostgreSQL hash of id), \
         orders ({} rows, placed by the WebAssembly function tenant_prefix: a tenant's orders on one shard)",
        TENANTS.len() * ORDERS_PER_TENANT
    ));
    announce("# proxyctl's environment (any node's admin API will do):".into());
    announce(format!(
        "export HOTREPART_ADMIN=http://127.0.0.1:{}",
        nodes[0].admin
    ));
    announce(format!("export HOTREPART_TOKEN={token}"));
    announce("# try:".into());
    announce("proxyctl range list".into());
    if let Some(s) = servers.spare.first() {
        announce(format!(
            "proxyctl reshard add-shard shard{} --dsn '{}' --rebalance --wait",
            servers.shards.len(),
            s.dsn()
        ));
    }
    let mut load = String::from("proxyctl loadtest --setup --duration 20s");
    for n in &nodes {
        load.push_str(&format!(" --node '{}'", node_dsn(n.port)));
    }
    for (j, s) in servers.shards.iter().chain(&servers.spare).enumerate() {
        load.push_str(&format!(" --shard 'shard{j}={}'", s.dsn()));
    }
    announce(load);
    announce(
        "curl -s -H \"Authorization: Bearer $HOTREPART_TOKEN\" $HOTREPART_ADMIN/metrics | grep -v '^#'"
            .into(),
    );
    announce("# Ctrl-C stops the nodes and every PostgreSQL server of the demo".into());

    wait_for_signal().await;
    stop(nodes).await;
    drop(servers); // stops every PostgreSQL server
    Ok(())
}

async fn stop(nodes: Vec<DemoNode>) {
    for n in &nodes {
        n.node.shutdown(Node::SHUTDOWN_GRACE).await;
    }
    for n in &nodes {
        n.catalog.shutdown().await;
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
