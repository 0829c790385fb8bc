//! The admin console over the PostgreSQL protocol: a client that connects
//! to the virtual database `hotrepart` as one of the `admin_users` (after
//! the usual authentication) talks to the node itself, not to a shard,
//! with PgBouncer's commands where they overlap (`SHOW POOLS`, `SHOW
//! STATS`, `SHOW SERVERS`, `SHOW DATABASES`, `SHOW CONFIG`, `SHOW
//! VERSION`, `SHOW LISTS`, `SHOW STATE`, `SHOW CLIENTS` as a count,
//! `RELOAD`, `PAUSE [db]`, `RESUME [db]`) and the node's own (`SHOW
//! SHARDS`, `SHOW RANGES`, `SHOW TABLES`, `SHOW FUNCTIONS`, `SHOW JOBS`,
//! `SHOW NODES`, `SHOW HELP`). Columns are text; names follow PgBouncer's
//! where the meaning is the same, so DBAs' habits and exporters that read
//! them work (the result sets are in `console/show.rs`). Simple queries
//! only (as PgBouncer's console); anything else gets a clear error and the
//! session goes on.

mod show;

use crate::error::sqlstate;
use crate::node::Node;
use crate::wire::{self, be, fe, FrameReader, Severity};
use bytes::{BufMut, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// The virtual database of the console.
pub const DATABASE: &str = "hotrepart";

/// A result set: column names and rows of text (None: NULL).
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[&'static str]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, values: Vec<String>) {
        self.rows.push(values.into_iter().map(Some).collect());
    }

    fn write(&self, out: &mut BytesMut) {
        wire::text_row_description(out, &self.columns);
        for r in &self.rows {
            wire::text_data_row(out, r);
        }
    }
}

/// What a command answers: a result set or a bare tag, then its tag.
enum Answer {
    Rows(Table),
    Done(&'static str),
    Empty,
}

/// An error for the console client: SQLSTATE and message.
type ConsoleError = (&'static str, String);

/// Serves an admin console session until the client leaves.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(node: Arc<Node>, mut r: FrameReader<S>) {
    loop {
        let Ok(f) = r.next().await else {
            return;
        };
        let mut out = BytesMut::new();
        match f.tag() {
            fe::QUERY => {
                let mut b = f.body();
                match wire::get_cstr(&mut b) {
                    Ok(sql) => match answer(&node, sql).await {
                        Ok(Answer::Rows(t)) => {
                            t.write(&mut out);
                            out.put_slice(&wire::command_complete("SHOW"));
                        }
                        Ok(Answer::Done(tag)) => out.put_slice(&wire::command_complete(tag)),
                        Ok(Answer::Empty) => {
                            wire::frame(&mut out, be::EMPTY_QUERY_RESPONSE, |_| {})
                        }
                        Err((code, msg)) => {
                            wire::error_response(&mut out, Severity::Error, code, &msg)
                        }
                    },
                    Err(_) => wire::error_response(
                        &mut out,
                        Severity::Error,
                        sqlstate::PROTOCOL_VIOLATION,
                        "invalid Query message",
                    ),
                }
                wire::ready_for_query(&mut out, wire::tx::IDLE);
            }
            fe::TERMINATE => return,
            fe::SYNC => {
                wire::error_response(
                    &mut out,
                    Severity::Error,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the admin console accepts simple queries only",
                );
                wire::ready_for_query(&mut out, wire::tx::IDLE);
            }
            // Other extended-protocol messages: answered at their Sync.
            _ => continue,
        }
        if r.get_mut().write_all(&out).await.is_err() {
            return;
        }
    }
}

const HELP: &str = "SHOW HELP | VERSION | POOLS | STATS | SERVERS | DATABASES | CLIENTS | LISTS | CONFIG | STATE | SHARDS | RANGES | TABLES | FUNCTIONS | JOBS | NODES; RELOAD; PAUSE [db]; RESUME [db]";

/// The answer to one console command.
async fn answer(node: &Node, sql: &str) -> Result<Answer, ConsoleError> {
    let text = sql.trim().trim_end_matches(';');
    let words: Vec<&str> = text.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    // A database name as PgBouncer reads it: the word as typed, quotes
    // taken off.
    let db = |i: usize| words.get(i).map(|w| w.trim_matches('"').to_string());
    match upper.as_slice() {
        [] => Ok(Answer::Empty),
        ["SHOW", what] => show::show(node, what).map(Answer::Rows),
        ["RELOAD"] => reload(node).map(|()| Answer::Done("RELOAD")),
        ["PAUSE"] | ["PAUSE", _] => pause(node, db(1).as_deref())
            .await
            .map(|()| Answer::Done("PAUSE")),
        ["RESUME"] | ["RESUME", _] => {
            let d = db(1);
            node.pause
                .resume(d.as_deref())
                .map_err(|e| (sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string()))?;
            tracing::info!(database = d.as_deref().unwrap_or("(all)"), "RESUME");
            Ok(Answer::Done("RESUME"))
        }
        _ => Err((
            sqlstate::SYNTAX_ERROR,
            format!(
                "unknown admin console command \"{}\"; commands: {HELP}",
                sql.trim()
            ),
        )),
    }
}

/// `RELOAD`: the configuration file again ([`crate::control::reload`]).
fn reload(node: &Node) -> Result<(), ConsoleError> {
    let r = crate::control::reload::reload(node).map_err(|e| {
        tracing::warn!(error = %e, "RELOAD failed");
        (sqlstate::CONFIG_FILE_ERROR, format!("RELOAD: {e}"))
    })?;
    if !r.failed.is_empty() {
        return Err((
            sqlstate::CONFIG_FILE_ERROR,
            format!("RELOAD: {}", r.failed.join("; ")),
        ));
    }
    if r.refused.is_empty() {
        return Ok(());
    }
    let applied = if r.changed.is_empty() {
        "nothing else changed".to_string()
    } else {
        format!("applied: {}", r.changed.join("; "))
    };
    Err((
        sqlstate::CANT_CHANGE_RUNTIME_PARAM,
        format!(
            "RELOAD: {} cannot be changed without restarting the node; the running value is kept ({applied})",
            r.refused.join(", ")
        ),
    ))
}

/// How often PAUSE looks whether every server connection is back.
const PAUSE_POLL: Duration = Duration::from_millis(10);

/// `PAUSE [db]`: new transactions wait from now on; returns once every
/// server connection concerned is back in its pool (then closes them, so
/// that the shards can restart), or RESUME came first.
async fn pause(node: &Node, database: Option<&str>) -> Result<(), ConsoleError> {
    node.pause
        .pause(database)
        .map_err(|e| (sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string()))?;
    tracing::info!(
        database = database.unwrap_or("(all)"),
        "PAUSE: waiting for the server connections in use"
    );
    let concerned = || {
        node.pools
            .all()
            .into_iter()
            .filter(move |((_, d, u), _)| {
                !u.starts_with('\u{0}') && database.is_none_or(|x| x == d)
            })
            .map(|(_, p)| p)
    };
    loop {
        let busy: usize = concerned().map(|p| p.busy_count()).sum();
        if busy == 0 {
            break;
        }
        let still = match database {
            None => node.pause.paused().0,
            Some(d) => node.pause.holds(d),
        };
        if !still {
            return Err((
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                "RESUME came before every server connection was back in its pool".into(),
            ));
        }
        tokio::time::sleep(PAUSE_POLL).await;
    }
    let closed: usize = concerned().map(|p| p.close_idle()).sum();
    tracing::info!(
        database = database.unwrap_or("(all)"),
        closed,
        "PAUSE: every server connection is back; idle ones closed"
    );
    Ok(())
}
