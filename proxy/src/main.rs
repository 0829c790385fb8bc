//! `hotrepart`: the node binary. Parses arguments and calls the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hotrepart",
    version,
    about = "PostgreSQL wire-compatible sharding proxy"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node from a configuration file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Try the whole product locally: nodes replicating the catalog with
    /// Paxos, local PostgreSQL shards plus spare servers, the admin API, a
    /// sample schema (hash and WebAssembly placement) with rows. Prints
    /// `ready: …`, the psql line of each node, proxyctl's environment and
    /// commands to try; Ctrl-C stops everything.
    Demo {
        /// Nodes (1: a single node, no Paxos).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// PostgreSQL shards in the catalog.
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// Spare PostgreSQL servers, not in the catalog (for `proxyctl
        /// reshard add-shard`).
        #[arg(long, default_value_t = 1)]
        spare: usize,
        /// Client port of node 1 (node i listens on PORT + i - 1); 0: any
        /// free ports.
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Admin API port of node 1 (likewise); 0: any free ports.
        #[arg(long, default_value_t = 7432)]
        admin_port: u16,
        /// Where the servers and catalog journals live (emptied first;
        /// default: $TMPDIR/hotrepart-demo).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print a password verifier for the config file (reads the password
    /// from standard input).
    HashPassword {
        /// md5 verifier for this user instead of SCRAM-SHA-256.
        #[arg(long)]
        md5_user: Option<String>,
    },
}

/// Logs on stderr: `HOTREPART_LOG` filters (default `info`; a config
/// file's `log_level` replaces it once read);
/// `HOTREPART_LOG_FORMAT` is `text` (default; colours only when stderr is
/// a terminal) or `json` (one JSON object per line). Returns the hook that
/// sets the filter later (a reload's `log_level`).
fn init_logging() -> anyhow::Result<hotrepart_proxy::node::LogFilterHook> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("HOTREPART_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let format = std::env::var("HOTREPART_LOG_FORMAT").unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    fn parse(level: &str) -> Result<EnvFilter, String> {
        EnvFilter::try_new(level).map_err(|e| format!("invalid log_level {level:?}: {e}"))
    }
    Ok(match format.as_str() {
        "" | "text" => {
            let b = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |level: &str| h.reload(parse(level)?).map_err(|e| e.to_string()))
        }
        "json" => {
            let b = builder.json().with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |level: &str| h.reload(parse(level)?).map_err(|e| e.to_string()))
        }
        other => anyhow::bail!("HOTREPART_LOG_FORMAT={other:?}: expected text or json"),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let set_log_filter = init_logging()?;
    // HOTREPART_RUNTIME=current_thread runs the node on one thread (one
    // event loop, no work stealing): a benchmark knob (bench/README.md);
    // the default is tokio's multi-threaded runtime, a worker per core
    // (TOKIO_WORKER_THREADS sets how many).
    let rt = match std::env::var("HOTREPART_RUNTIME").as_deref() {
        Ok("current_thread") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Ok("multi_thread") | Err(_) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        Ok(other) => {
            anyhow::bail!("HOTREPART_RUNTIME={other:?}: expected multi_thread or current_thread")
        }
    };
    match cli.cmd {
        Cmd::Serve { config } => rt.block_on(async {
            let cfg = hotrepart_proxy::Config::load(&config)?;
            cfg.check_placeholders()?;
            if let Some(level) = &cfg.log_level {
                set_log_filter(level).map_err(anyhow::Error::msg)?;
            }
            let catalog = hotrepart_proxy::control::cluster::start_catalog(&cfg)
                .await
                .context("cannot start the routing catalog")?;
            let node = hotrepart_proxy::Node::with_catalog(cfg.clone(), catalog.clone())?;
            let _ = node.config_file.set(config.clone());
            let _ = node.log_filter.set(set_log_filter);
            hotrepart_proxy::control::resolver::check_claims(&node)
                .await
                .map_err(|why| anyhow::anyhow!("refusing to start: {why}"))?;
            let listener = node.bind().await?;
            tracing::info!(addr = %listener.local_addr()?, "listening");
            if let Some(a) = &cfg.admin {
                let allow = cfg
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.allow_fault_injection);
                let addr = hotrepart_proxy::control::admin::serve_tls(
                    node.clone(),
                    &a.listen,
                    a.token()?,
                    allow,
                    a.tls_files(),
                )
                .await
                .with_context(|| format!("cannot listen on [admin] {}", a.listen))?;
                tracing::info!(%addr, https = a.tls_files().is_some(), "admin API listening");
            }
            node.start(listener);
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut hup = signal(SignalKind::hangup())?;
            loop {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => { r?; break }
                    _ = term.recv() => break,
                    _ = hup.recv() => {
                        tracing::info!(file = %config.display(), "SIGHUP: reloading the configuration");
                        if let Err(e) = hotrepart_proxy::control::reload::reload(&node) {
                            tracing::error!(error = %e, "SIGHUP: reload failed");
                        }
                    }
                }
            }
            node.shutdown(hotrepart_proxy::Node::SHUTDOWN_GRACE).await;
            catalog.shutdown().await;
            anyhow::Ok(())
        }),
        Cmd::Demo {
            nodes,
            shards,
            spare,
            port,
            admin_port,
            data_dir,
        } => rt.block_on(async {
            let mut opts = hotrepart_proxy::tools::demo::DemoOptions {
                nodes,
                shards,
                spare,
                port,
                admin_port,
                ..Default::default()
            };
            if let Some(d) = data_dir {
                opts.data_dir = d;
            }
            hotrepart_proxy::tools::demo::run(opts, |line| {
                let mut out = std::io::stdout();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            })
            .await
            .context("demo failed")
        }),
        Cmd::HashPassword { md5_user } => {
            let mut pw = String::new();
            std::io::stdin().read_line(&mut pw)?;
            let pw = pw.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!pw.is_empty(), "empty password on standard input");
            let v = match md5_user {
                Some(u) => hotrepart_proxy::frontend::auth::md5_verifier(&u, pw),
                None => hotrepart_proxy::frontend::auth::scram_verifier(pw),
            };
            writeln!(std::io::stdout(), "{v}")?;
            Ok(())
        }
    }
}
