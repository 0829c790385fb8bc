//! Finding the installed PostgreSQL client and server programs (`pg_dump`
//! for the schema copy of a new shard; `initdb`, `pg_ctl`, `postgres` for
//! the local servers of `tools::localpg`).
//!
//! Guarantee: [`find`] returns a directory that holds every program asked
//! for, looking in `$PG_BIN`, then Debian's versioned
//! `/usr/lib/postgresql/<major>/bin` (newest first: `/usr/bin` may hold only
//! wrapper scripts), then `$PATH`; it never runs anything.

use std::path::{Path, PathBuf};

/// Where the PostgreSQL programs are looked for, in order, for messages.
pub(crate) const SEARCHED: &str = "$PG_BIN, /usr/lib/postgresql/*/bin, $PATH";

/// The first directory holding every program of `programs`, or `None`.
pub(crate) fn find(programs: &[&str]) -> Option<PathBuf> {
    let ok = |d: &Path| programs.iter().all(|p| d.join(p).exists());
    if let Some(d) = std::env::var_os("PG_BIN").map(PathBuf::from) {
        if ok(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| ok(p))
        .collect();
    versions.sort();
    if let Some((_, p)) = versions.pop() {
        return Some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).find(|d| ok(d))
}
