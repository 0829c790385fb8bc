//! `hotrepart demo`: N local PostgreSQL shards and one node in front of them,
//! in the foreground, everything stopped again on Ctrl-C/SIGTERM.

use crate::config::Config;
use crate::node::Node;
use crate::tools::localpg::{free_port, LocalPg, LocalPgError, PgInstall};
use std::path::PathBuf;

/// Demo client credentials (loopback only).
pub const DEMO_USER: &str = "app";
pub const DEMO_PASSWORD: &str = "app";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Pg(#[from] LocalPgError),
    #[error("{0}")]
    Other(String),
}

/// A running demo: shards plus node configuration.
pub struct Demo {
    pub shards: Vec<LocalPg>,
    pub config: Config,
}

/// Starts `n` shards under `data_dir` and returns the node config for them.
pub fn start_shards(
    n: usize,
    data_dir: &std::path::Path,
    listen_port: u16,
) -> Result<Demo, DemoError> {
    if n == 0 {
        return Err(DemoError::Other("--shards must be at least 1".into()));
    }
    let install = PgInstall::find()?;
    let password = format!("pw{:016x}", rand::random::<u64>());
    let mut shards = Vec::new();
    for i in 0..n {
        let port = free_port().map_err(|e| DemoError::Other(format!("no free port: {e}")))?;
        let dir = data_dir.join(format!("shard{i}"));
        // A previous demo's data dir is reused only if its password matches;
        // start from scratch to keep things simple and predictable.
        let _ = std::fs::remove_dir_all(&dir);
        shards.push(LocalPg::start(&install, &dir, port, &password, None)?);
    }
    let mut toml = format!("listen = \"127.0.0.1:{listen_port}\"\npool_size = 20\n");
    for (i, s) in shards.iter().enumerate() {
        toml.push_str(&format!(
            "[[shards]]\nname = \"shard{i}\"\ndsn = \"{}\"\n",
            s.dsn()
        ));
    }
    toml.push_str(&format!(
        "[[users]]\nname = \"{DEMO_USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n",
        crate::frontend::auth::scram_verifier(DEMO_PASSWORD)
    ));
    let config = Config::from_toml(&toml).map_err(|e| DemoError::Other(e.to_string()))?;
    Ok(Demo { shards, config })
}

/// Runs the demo until Ctrl-C or SIGTERM. `announce` receives the ready line.
pub async fn run(
    n: usize,
    port: u16,
    data_dir: Option<PathBuf>,
    announce: impl FnOnce(String),
) -> Result<(), DemoError> {
    let dir = data_dir.unwrap_or_else(|| std::env::temp_dir().join("hotrepart-demo"));
    let demo = tokio::task::block_in_place(|| start_shards(n, &dir, port))?;
    let node = Node::new(demo.config.clone()).map_err(|e| DemoError::Other(e.to_string()))?;
    let listener = node
        .bind()
        .await
        .map_err(|e| DemoError::Other(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| DemoError::Other(e.to_string()))?;
    node.start(listener);
    announce(format!(
        "ready: postgres://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{}/postgres",
        addr.port()
    ));
    wait_for_signal().await;
    node.shutdown(Node::SHUTDOWN_GRACE).await;
    drop(demo); // stops every shard
    Ok(())
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
