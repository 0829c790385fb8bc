//! Real `hotrepart serve` processes forming one catalog cluster, for tests
//! that kill -9 nodes. The binaries are built (or found up to date) with
//! cargo once per test process, in the test's own target directory.

use crate::{start_pg, TestDir, PASSWORD, USER};
use hotrepart_proxy::tools::localpg::{free_port, LocalPg};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Admin token of test clusters.
pub const TOKEN: &str = "test-admin-token-0123456789";
/// Cluster secret of test clusters.
pub const SECRET: &str = "test-cluster-secret-0123456789";

/// Path of a binary of the proxy crate (`hotrepart`, `proxyctl`), built
/// once per test process so it is never stale.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // Binaries built beforehand (bench/soak.sh: release nodes driven
        // by the debug test binary).
        if let Some(d) = std::env::var_os("HOTREPART_BIN_DIR") {
            return PathBuf::from(d);
        }
        // <target>/<profile>/deps/<test binary>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target = profile_dir.parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut c = Command::new(cargo);
        c.args([
            "build",
            "-q",
            "-p",
            "hotrepart-proxy",
            "--bins",
            "--manifest-path",
        ])
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            c.arg("--release");
        }
        let st = c
            .status()
            .expect("run cargo build for the hotrepart binaries");
        assert!(st.success(), "cargo build of the hotrepart binaries failed");
        profile_dir
    });
    dir.join(name)
}

/// Sends SIGINT to a child process (`proxyctl loadtest` then ends its load
/// and runs its check).
pub fn interrupt(child: &tokio::process::Child) {
    let pid = child.id().expect("the child is running");
    let st = Command::new("kill")
        .arg("-INT")
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -INT {pid} failed");
}

/// One node process and its ports.
pub struct ProcNode {
    pub id: u64,
    pub port: u16,
    pub peer_port: u16,
    pub admin_port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Environment of every run of the process (e.g. the test-only
    /// `HOTREPART_TEST_JOB_STEP_DELAY_MS`), restarts included.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ProcNode {
    /// A node process run from `config` (not started), for tests that
    /// write their own configuration; `port` and `admin_port` are the
    /// ports it names (it is ready once the admin port answers).
    pub fn from_config(config: PathBuf, log: PathBuf, port: u16, admin_port: u16) -> ProcNode {
        ProcNode {
            id: 1,
            port,
            peer_port: 0,
            admin_port,
            config,
            log,
            env: Vec::new(),
            child: None,
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (or restarts) the process; returns once it accepts clients.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Like [`ProcNode::start`], with extra environment variables for this
    /// run of the process only (e.g. `HOTREPART_FAILPOINT`), after the
    /// node's own [`ProcNode::env`]. The test's own `HOTREPART_FAILPOINT`
    /// is never inherited.
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("hotrepart"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("HOTREPART_LOG", "info,hotrepart_routing_paxos=debug")
            .env_remove("HOTREPART_FAILPOINT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn hotrepart");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).is_err() {
            if let Some(Some(st)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "node {} exited at start ({st}); log:\n{}",
                    self.id,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node {} did not open its admin port",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (a graceful stop: the node drains its clients) and waits
    /// for the exit; kill -9 after `within`. Returns whether it exited by
    /// itself.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("sh")
            .args(["-c", "kill -TERM \"$0\"", &c.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process has exited on its own (a failpoint's abort);
    /// reaps it. A node killed with [`ProcNode::kill9`] is not running.
    pub fn exited(&mut self) -> bool {
        let gone = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some());
        if gone {
            self.child = None;
        }
        gone
    }

    /// Client DSN (user `app`).
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=postgres",
            self.port
        )
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }
}

impl Drop for ProcNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// PostgreSQL shards plus `n` node processes replicating one catalog.
pub struct ProcCluster {
    pub nodes: Vec<ProcNode>,
    pub shards: Vec<LocalPg>,
    pub dir: TestDir,
}

impl ProcCluster {
    /// `tail`: extra TOML appended to every node's file (tables…);
    /// `cluster_extra`: extra lines of the `[cluster]` table.
    pub async fn start(
        nodes: usize,
        shards: usize,
        tail: &str,
        cluster_extra: &str,
    ) -> ProcCluster {
        ProcCluster::start_with(nodes, shards, "", tail, cluster_extra).await
    }

    /// As [`ProcCluster::start`], with `head`: top-level keys (e.g.
    /// `twopc_grace_ms = 500`) written before the first table of every
    /// node's file. (Keys in `tail` land in the last table written before
    /// it, so top-level keys cannot go there.)
    pub async fn start_with(
        nodes: usize,
        shards: usize,
        head: &str,
        tail: &str,
        cluster_extra: &str,
    ) -> ProcCluster {
        ProcCluster::start_with_env(nodes, shards, head, tail, cluster_extra, &[]).await
    }

    /// As [`ProcCluster::start_with`], with `env` set for every node
    /// process, at every (re)start ([`ProcNode::env`]).
    pub async fn start_with_env(
        nodes: usize,
        shards: usize,
        head: &str,
        tail: &str,
        cluster_extra: &str,
        env: &[(&str, &str)],
    ) -> ProcCluster {
        let dir = TestDir::new("procs");
        let d = dir.0.clone();
        let pgs = tokio::task::spawn_blocking(move || {
            (0..shards)
                .map(|i| start_pg(&d.join(format!("s{i}"))))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let ports: Vec<(u16, u16, u16)> = (0..nodes)
            .map(|_| {
                (
                    free_port().unwrap(),
                    free_port().unwrap(),
                    free_port().unwrap(),
                )
            })
            .collect();
        let mut list = Vec::new();
        for (i, &(port, peer_port, admin_port)) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let mut toml = format!("listen = \"127.0.0.1:{port}\"\npool_size = 8\n{head}\n");
            for (j, s) in pgs.iter().enumerate() {
                toml.push_str(&format!(
                    "[[shards]]\nname = \"s{j}\"\ndsn = \"{}\"\n",
                    s.dsn()
                ));
            }
            toml.push_str(&format!(
                "[[users]]\nname = \"{USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n",
                hotrepart_proxy::frontend::auth::scram_verifier(PASSWORD)
            ));
            toml.push_str(&format!(
                "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\"\n"
            ));
            toml.push_str(&format!(
                "[cluster]\nnode_id = {id}\nlisten = \"127.0.0.1:{peer_port}\"\nsecret = \"{SECRET}\"\ndata_dir = \"{}\"\nallow_fault_injection = true\n{cluster_extra}\n",
                dir.0.join(format!("node{id}")).display()
            ));
            for (j, &(_, pp, ap)) in ports.iter().enumerate() {
                if j != i {
                    toml.push_str(&format!(
                        "[[cluster.peers]]\nid = {}\naddr = \"127.0.0.1:{pp}\"\nadmin = \"http://127.0.0.1:{ap}\"\n",
                        j + 1
                    ));
                }
            }
            toml.push_str(tail);
            let config = dir.0.join(format!("node{id}.toml"));
            std::fs::write(&config, toml).unwrap();
            list.push(ProcNode {
                id,
                port,
                peer_port,
                admin_port,
                config,
                log: dir.0.join(format!("node{id}.log")),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                child: None,
            });
        }
        let mut c = ProcCluster {
            nodes: list,
            shards: pgs,
            dir,
        };
        tokio::task::block_in_place(|| {
            for n in &mut c.nodes {
                n.start();
            }
        });
        c
    }

    /// Starts one more node, with `[cluster] join = true` and the current
    /// nodes as its peers: it waits to be added (`proxyctl node add`).
    /// Its configuration is node 1's with its own ports and directory (the
    /// cluster must have been started with an empty `cluster_extra`).
    /// Returns its index in `nodes`.
    pub fn start_joining_node(&mut self) -> usize {
        let first = &self.nodes[0];
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let (port, peer_port, admin_port) = (
            free_port().unwrap(),
            free_port().unwrap(),
            free_port().unwrap(),
        );
        let text = std::fs::read_to_string(&first.config).unwrap();
        let first_peer = format!(
            "[[cluster.peers]]\nid = {}\naddr = \"127.0.0.1:{}\"\nadmin = \"{}\"\n",
            first.id,
            first.peer_port,
            first.admin_url()
        );
        let text = text
            .replace(
                &format!("node_id = {}\n", first.id),
                &format!("node_id = {id}\n"),
            )
            .replace(
                &format!("127.0.0.1:{}\"", first.port),
                &format!("127.0.0.1:{port}\""),
            )
            .replace(
                &format!("127.0.0.1:{}\"\nsecret", first.peer_port),
                &format!("127.0.0.1:{peer_port}\"\nsecret"),
            )
            .replace(
                &format!("127.0.0.1:{}\"\ntoken", first.admin_port),
                &format!("127.0.0.1:{admin_port}\"\ntoken"),
            )
            .replace(&format!("node{}\"", first.id), &format!("node{id}\""))
            .replace(
                "allow_fault_injection = true\n",
                &format!("allow_fault_injection = true\njoin = true\n\n{first_peer}"),
            );
        let config = self.dir.0.join(format!("node{id}.toml"));
        std::fs::write(&config, text).unwrap();
        let mut node = ProcNode {
            id,
            port,
            peer_port,
            admin_port,
            config,
            log: self.dir.0.join(format!("node{id}.log")),
            env: first.env.clone(),
            child: None,
        };
        tokio::task::block_in_place(|| node.start());
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Runs `proxyctl` against node `i` (index in `nodes`).
    pub async fn proxyctl(&self, i: usize, args: &[&str]) -> (bool, String, String) {
        let url = self.nodes[i].admin_url();
        let mut all = vec!["--admin", url.as_str(), "--token", TOKEN];
        all.extend_from_slice(args);
        crate::run_cmd(bin("proxyctl").to_str().unwrap(), &all, &[]).await
    }

    /// Starts `proxyctl` against node `i` as a child process (killed on
    /// drop): stdout piped, stderr appended to `stderr_log`.
    pub fn spawn_proxyctl(
        &self,
        i: usize,
        args: &[String],
        stderr_log: &std::path::Path,
    ) -> tokio::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr_log)
            .unwrap();
        tokio::process::Command::new(bin("proxyctl"))
            .arg("--admin")
            .arg(self.nodes[i].admin_url())
            .arg("--token")
            .arg(TOKEN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn proxyctl")
    }

    /// `GET <admin API of node i><path>` (e.g. `/v1/jobs/<id>`) straight
    /// over HTTP (no proxyctl process: cheap enough to poll between
    /// statements); None when the node does not answer or answers an
    /// error.
    pub async fn admin_get(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let url = format!("{}{path}", self.nodes[i].admin_url());
        tokio::task::spawn_blocking(move || {
            let agent = ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build(),
            );
            let mut res = agent
                .get(&url)
                .header("Authorization", &format!("Bearer {TOKEN}"))
                .call()
                .ok()?;
            if !res.status().is_success() {
                return None;
            }
            let text = res.body_mut().read_to_string().ok()?;
            serde_json::from_str(&text).ok()
        })
        .await
        .ok()
        .flatten()
    }

    /// `proxyctl --json status` of node `i`, or None if it does not answer.
    pub async fn status(&self, i: usize) -> Option<serde_json::Value> {
        let (ok, out, _) = self.proxyctl(i, &["--json", "status"]).await;
        if !ok {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    /// Key ranges as node `i` lists them: (lo, hi, write owner).
    pub async fn ranges(&self, i: usize) -> Vec<(u64, Option<u64>, String)> {
        let (ok, out, err) = self.proxyctl(i, &["--json", "range", "list"]).await;
        assert!(ok, "range list: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["lo"].as_u64().unwrap(),
                    r["hi"].as_u64(),
                    r["write_owner"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Rows of a table sharded by `id bigint` (built-in hash, seed 0), read
    /// directly on shards `s0, s1, …` at `dsns` with `query` (which returns
    /// `id bigint, n int`): each row's `n` by id, and rows per shard.
    /// Panics when a row is stored twice or on a shard that does not own
    /// its point (by node 0's routing table).
    pub async fn placed_rows(
        &self,
        dsns: &[String],
        query: &str,
    ) -> (std::collections::BTreeMap<i64, i32>, Vec<usize>) {
        let (seen, per_shard) = self
            .placed_rows_with(dsns, query, |row| {
                let id: i64 = row.get(0);
                let n: i32 = row.get(1);
                (
                    id.to_string(),
                    hotrepart_router::hash::hashint8extended(id, 0),
                    (id, n),
                )
            })
            .await;
        (seen.into_values().collect(), per_shard)
    }

    /// As [`ProcCluster::placed_rows`] for any key type and routing
    /// function: `row` gives each row's key (as text, to find duplicates),
    /// its point and a value to return. Returns the values by key and rows
    /// per shard.
    pub async fn placed_rows_with<T>(
        &self,
        dsns: &[String],
        query: &str,
        row: impl Fn(&tokio_postgres::Row) -> (String, u64, T),
    ) -> (std::collections::BTreeMap<String, T>, Vec<usize>) {
        let rs = self.ranges(0).await;
        let mut seen = std::collections::BTreeMap::new();
        let mut per_shard = vec![0; dsns.len()];
        for (si, dsn) in dsns.iter().enumerate() {
            let db = crate::connect(dsn).await.unwrap();
            for r in db.query(query, &[]).await.unwrap() {
                let (key, p, value) = row(&r);
                assert!(
                    seen.insert(key.clone(), value).is_none(),
                    "row {key} is stored twice"
                );
                per_shard[si] += 1;
                let owner = &rs
                    .iter()
                    .find(|(lo, hi, _)| p >= *lo && hi.is_none_or(|h| p < h))
                    .unwrap()
                    .2;
                assert_eq!(
                    owner,
                    &format!("s{si}"),
                    "row {key} (point {p:#018x}) is on s{si}, its range is owned by {owner}"
                );
            }
        }
        (seen, per_shard)
    }

    /// The leader as node `i` sees it.
    pub async fn leader(&self, i: usize) -> Option<u64> {
        self.status(i).await?["cluster"]["leader"].as_u64()
    }

    /// Waits until every running node has the routing catalog and a leader.
    pub async fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let mut all = true;
            for (i, n) in self.nodes.iter().enumerate() {
                if !n.running() {
                    continue;
                }
                let ok = match self.status(i).await {
                    Some(s) => {
                        s["ready"] == serde_json::json!(true) && s["cluster"]["leader"].is_u64()
                    }
                    None => false,
                };
                all &= ok;
            }
            if all {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "the nodes did not get ready; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Node logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- node {} ---\n{}",
                    n.id,
                    std::fs::read_to_string(&n.log).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
