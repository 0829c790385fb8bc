//! Local PostgreSQL servers for `hotrepart demo` and the integration tests:
//! find the installed binaries, `initdb`, `pg_ctl start/stop`.
//!
//! Guarantees: servers listen on 127.0.0.1 only, on the port given; when the
//! node runs as root they run as an unprivileged user (`postgres`, else
//! `nobody`), since PostgreSQL refuses root; [`LocalPg`] stops its server
//! when dropped, so a failing test leaves no server behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql/*/bin.\n\
         Install them with:  sudo apt-get install -y postgresql   (Debian/Ubuntu)\n\
         or set PG_BIN to the directory holding initdb and pg_ctl."
    )]
    NotInstalled,
    #[error("{cmd} failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The directory holding initdb, pg_ctl and postgres.
#[derive(Debug, Clone)]
pub struct PgInstall {
    pub bin: PathBuf,
}

impl PgInstall {
    pub fn find() -> Result<PgInstall, LocalPgError> {
        crate::control::jobs::pgbin::find(&["initdb", "pg_ctl", "postgres"])
            .map(|bin| PgInstall { bin })
            .ok_or(LocalPgError::NotInstalled)
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}

/// The unprivileged account servers run as when we are root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY-free: geteuid has no preconditions; libc wrappers are safe fns
    // only through `unsafe`, so use the `id` command instead.
    let out = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        return None;
    }
    for user in ["postgres", "nobody"] {
        let uid = Command::new("id").args(["-u", user]).output().ok()?;
        let gid = Command::new("id").args(["-g", user]).output().ok()?;
        if uid.status.success() && gid.status.success() {
            let u = String::from_utf8_lossy(&uid.stdout).trim().parse().ok()?;
            let g = String::from_utf8_lossy(&gid.stdout).trim().parse().ok()?;
            return Some((u, g));
        }
    }
    None
}

fn command(prog: &Path, owner: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(prog);
    if let Some((u, g)) = owner {
        std::os::unix::process::CommandExt::uid(&mut c, u);
        std::os::unix::process::CommandExt::gid(&mut c, g);
    }
    c.env_remove("PGDATA").env("LC_ALL", "C");
    c
}

fn run(mut c: Command, what: &str) -> Result<(), LocalPgError> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LocalPgError::Command {
            cmd: what.into(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LocalPgError::Command {
            cmd: what.into(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocalPgError + '_ {
    move |source| LocalPgError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn chown_r(path: &Path, owner: Option<(u32, u32)>) -> Result<(), LocalPgError> {
    if let Some((u, g)) = owner {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("-R").arg(format!("{u}:{g}")).arg(path);
                c
            },
            "chown",
        )?;
    }
    Ok(())
}

/// Picks a free loopback port.
///
/// Ports come from 20000–32767, below Linux's ephemeral range (32768–60999
/// by default), so an outgoing connection's source port never takes one
/// between this check and the server's bind. Each port handed out is
/// claimed for the life of the process with a lock file
/// (`$TMPDIR/hotrepart-ports/<port>`, `flock`), so concurrent test
/// processes never get the same one, and never twice in one process.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::Mutex;
    static CLAIMED: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("hotrepart-ports");
    std::fs::create_dir_all(&dir)?;
    let start =
        20_000 + (std::process::id() as u64 * 7919 + rand::random::<u64>() % 12_768) % 12_768;
    for i in 0..12_768u64 {
        let port = (20_000 + (start - 20_000 + i * 97) % 12_768) as u16;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(dir.join(port.to_string()))?;
        if f.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        CLAIMED.lock().unwrap_or_else(|e| e.into_inner()).push(f);
        return Ok(port);
    }
    // Everything claimed (should not happen): let the kernel choose.
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One running local PostgreSQL server.
pub struct LocalPg {
    pub install: PgInstall,
    pub dir: PathBuf,
    pub port: u16,
    pub superuser: String,
    pub password: String,
    owner: Option<(u32, u32)>,
    running: bool,
}

impl LocalPg {
    /// Creates (initdb) and starts a server in `dir/data`, with SCRAM
    /// authentication for `superuser`/`password` on 127.0.0.1:`port`.
    /// With `template`, the initdb result is cached in `template` and copied,
    /// which is much faster for many test servers.
    pub fn start(
        install: &PgInstall,
        dir: &Path,
        port: u16,
        password: &str,
        template: Option<&Path>,
    ) -> Result<LocalPg, LocalPgError> {
        let owner = run_as();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let data = dir.join("data");
        if !data.join("PG_VERSION").exists() {
            match template {
                Some(t) => {
                    if !t.join("PG_VERSION").exists() {
                        let tmp = t.with_extension(format!("tmp{}", std::process::id()));
                        let _ = std::fs::remove_dir_all(&tmp);
                        initdb(install, &tmp, password, owner, dir)?;
                        // Another process may have won the race; either copy is fine.
                        if std::fs::rename(&tmp, t).is_err() {
                            let _ = std::fs::remove_dir_all(&tmp);
                        }
                    }
                    run(
                        {
                            let mut c = Command::new("cp");
                            c.arg("-a").arg(t).arg(&data);
                            c
                        },
                        "cp template",
                    )?;
                }
                None => initdb(install, &data, password, owner, dir)?,
            }
        }
        chown_r(dir, owner)?;
        let mut pg = LocalPg {
            install: install.clone(),
            dir: dir.to_path_buf(),
            port,
            superuser: "postgres".into(),
            password: password.into(),
            owner,
            running: false,
        };
        pg.pg_ctl_start("")?;
        pg.running = true;
        Ok(pg)
    }

    /// Starts the (stopped) server with extra `postgres` options after the
    /// usual ones (a later `-c` wins), e.g. `-c max_prepared_transactions=0`.
    /// The stop is a clean one (`-m fast`): with `synchronous_commit=off`
    /// an immediate stop may lose the last commits.
    pub fn restart_with(&mut self, extra: &str) -> Result<(), LocalPgError> {
        self.stop_mode("fast")?;
        self.pg_ctl_start(extra)?;
        self.running = true;
        Ok(())
    }

    fn pg_ctl_start(&self, extra: &str) -> Result<(), LocalPgError> {
        let (dir, port) = (&self.dir, self.port);
        // max_prepared_transactions > 0: two-phase commit across shards.
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300 -c wal_level=logical \
             -c max_replication_slots=16 -c max_wal_senders=16 -c max_prepared_transactions=100 \
             -c shared_buffers=64MB {extra}",
            dir.display()
        );
        let mut c = command(&self.install.tool("pg_ctl"), self.owner);
        c.arg("-D")
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("postgres.log"))
            .arg("-o")
            .arg(opts)
            .args(["-w", "-t", "60", "start"]);
        run(c, "pg_ctl start").map_err(|e| match e {
            LocalPgError::Command { cmd, detail } => LocalPgError::Command {
                cmd,
                detail: format!(
                    "{detail}\n--- postgres.log ---\n{}",
                    std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default()
                ),
            },
            e => e,
        })
    }

    pub fn dsn(&self) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/postgres",
            self.superuser, self.password, self.port
        )
    }

    pub fn stop(&mut self) -> Result<(), LocalPgError> {
        self.stop_mode("immediate")
    }

    fn stop_mode(&mut self, mode: &str) -> Result<(), LocalPgError> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        let mut c = command(&self.install.tool("pg_ctl"), self.owner);
        c.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", mode, "-w", "stop"]);
        run(c, "pg_ctl stop")
    }
}

impl Drop for LocalPg {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn initdb(
    install: &PgInstall,
    data: &Path,
    password: &str,
    owner: Option<(u32, u32)>,
    scratch: &Path,
) -> Result<(), LocalPgError> {
    let pwfile = scratch.join(format!("pwfile.{}", std::process::id()));
    std::fs::write(&pwfile, format!("{password}\n")).map_err(io(&pwfile))?;
    if let Some(parent) = data.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::create_dir_all(data).map_err(io(data))?;
    chown_r(data, owner)?;
    chown_r(&pwfile, owner)?;
    let mut c = command(&install.tool("initdb"), owner);
    c.arg("-D")
        .arg(data)
        .args([
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ])
        .arg(format!("--pwfile={}", pwfile.display()));
    let r = run(c, "initdb");
    let _ = std::fs::remove_file(&pwfile);
    r
}
