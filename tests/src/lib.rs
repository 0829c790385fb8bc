//! Test harness: starts real PostgreSQL servers (initdb + pg_ctl, as an
//! unprivileged user when run as root, on free loopback ports) and a real
//! hotrepart node in front of them, and tears everything down on drop —
//! also when a test fails.
//!
//! The first server of a run is made with initdb into a template directory;
//! later ones copy it (much faster than initdb on 2 cores).
#![allow(clippy::unwrap_used)]

pub mod drivers;
pub mod merge_data;
pub mod netfault;
pub mod procs;

use hotrepart_proxy::tools::localpg::{free_port, LocalPg, PgInstall};
use hotrepart_proxy::{Config, Node};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Password of the `postgres` superuser on test shards.
pub const PG_PASSWORD: &str = "hrtest";
/// Client user/password for the node (SCRAM).
pub const USER: &str = "app";
pub const PASSWORD: &str = "secret";

static SEQ: AtomicUsize = AtomicUsize::new(0);

pub struct TestDir(pub PathBuf);
impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!(
            "hrtest-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }
}
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts one PostgreSQL server for a test.
pub fn start_pg(dir: &std::path::Path) -> LocalPg {
    let install = PgInstall::find().expect("PostgreSQL binaries (run deploy/setup.sh)");
    let template = std::env::temp_dir().join(format!(
        "hotrepart-pg-template-{}",
        install.bin.display().to_string().replace('/', "_")
    ));
    LocalPg::start(
        &install,
        dir,
        free_port().unwrap(),
        PG_PASSWORD,
        Some(&template),
    )
    .expect("start PostgreSQL")
}

/// Options for a test cluster.
pub struct Opts {
    pub shards: usize,
    /// Extra top-level config lines (e.g. "pool_size = 10").
    pub extra: String,
    /// Extra [[users]] (TOML); the SCRAM user `app` is always there.
    pub users: String,
    /// Appended last (TOML tables such as [[sharded_tables]], [tls]).
    pub tail: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            shards: 1,
            extra: String::new(),
            users: String::new(),
            tail: String::new(),
        }
    }
}

/// Shards plus one in-process node.
pub struct Cluster {
    pub node: Arc<Node>,
    pub addr: SocketAddr,
    pub shards: Vec<LocalPg>,
    pub dir: TestDir,
}

impl Cluster {
    pub async fn start(opts: Opts) -> Cluster {
        Cluster::start_with(opts, |_| {}).await
    }

    /// As [`Cluster::start`], with `customize` applied to the node before
    /// it serves (e.g. to replace its decision log).
    pub async fn start_with(opts: Opts, customize: impl FnOnce(&mut Node)) -> Cluster {
        let dir = TestDir::new("cluster");
        let d = dir.0.clone();
        let n = opts.shards;
        let shards = tokio::task::spawn_blocking(move || {
            (0..n)
                .map(|i| start_pg(&d.join(format!("s{i}"))))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let mut toml = format!("listen = \"127.0.0.1:0\"\n{}\n", opts.extra);
        for (i, s) in shards.iter().enumerate() {
            toml.push_str(&format!(
                "[[shards]]\nname = \"s{i}\"\ndsn = \"{}\"\n",
                s.dsn()
            ));
        }
        toml.push_str(&format!(
            "[[users]]\nname = \"{USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n{}\n",
            hotrepart_proxy::frontend::auth::scram_verifier(PASSWORD),
            opts.users
        ));
        toml.push_str(&opts.tail);
        let cfg = Config::from_toml(&toml).expect("test config");
        Cluster::with_config_and(cfg, shards, dir, customize).await
    }

    pub async fn with_config(cfg: Config, shards: Vec<LocalPg>, dir: TestDir) -> Cluster {
        Cluster::with_config_and(cfg, shards, dir, |_| {}).await
    }

    async fn with_config_and(
        cfg: Config,
        shards: Vec<LocalPg>,
        dir: TestDir,
        customize: impl FnOnce(&mut Node),
    ) -> Cluster {
        let mut node = Node::new(cfg).expect("node");
        customize(Arc::get_mut(&mut node).expect("a new node is not shared yet"));
        let listener = node.bind().await.expect("bind");
        let addr = listener.local_addr().unwrap();
        node.start(listener);
        Cluster {
            node,
            addr,
            shards,
            dir,
        }
    }

    /// DSN of the node for user `app`.
    pub fn dsn(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/postgres",
            self.addr.port()
        )
    }

    pub fn dsn_for(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/postgres",
            self.addr.port()
        )
    }

    /// A tokio-postgres client through the node.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.dsn()).await.expect("connect through node")
    }

    /// Proposes `cmd` to the node's catalog (it must be accepted) and waits
    /// until the node routes by the result; returns that epoch.
    pub async fn propose(&self, cmd: hotrepart_routing_paxos::CatalogCommand) -> u64 {
        self.node
            .catalog_handle
            .propose(cmd, Duration::from_secs(10))
            .await
            .expect("proposal decided")
            .expect("proposal accepted");
        let want = self
            .node
            .catalog_handle
            .catalog()
            .snapshot()
            .expect("a routing table")
            .epoch();
        wait_for("the routing table", Duration::from_secs(10), || async {
            self.node.routing.catalog.load().epoch() >= want
        })
        .await;
        want
    }

    /// A tokio-postgres client directly to shard `i`.
    pub async fn direct(&self, i: usize) -> tokio_postgres::Client {
        connect(&self.shards[i].dsn())
            .await
            .expect("connect to shard")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Starts the node's shutdown; the test's runtime ends what is left.
        self.node.stop();
    }
}

pub async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// Waits for `cond` with a deadline (no fixed sleeps in tests).
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a command-line client (psql, pgbench) and returns (status ok, stdout, stderr).
pub async fn run_cmd(prog: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = tokio::process::Command::new(prog);
    c.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(180), c.output())
        .await
        .unwrap_or_else(|_| panic!("{prog} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Path of a PostgreSQL client tool (psql, pgbench), preferring the
/// installation's own directory.
pub fn pg_tool(name: &str) -> String {
    if let Ok(i) = PgInstall::find() {
        let p = i.tool(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    name.to_string()
}
