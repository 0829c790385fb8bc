//! Unit tests of the session state machine without PostgreSQL: a real
//! [`crate::node::Node`] (in-memory catalog, configuration from TOML) whose
//! shards are [`fake_pg::FakePg`] servers, and a client driving
//! [`crate::session::Session`] over an in-memory duplex stream
//! ([`client::Client`]). Each test asserts the exact replies the client
//! gets and what reached the shards.
//!
//! To add a case: start a node with [`node`] (1 shard, or 2 with the
//! sharded table `accounts (id int8)`; undeclared tables live on `s0`),
//! script what the statements answer on the shard(s) with
//! [`fake_pg::FakePg::answer`], queue messages on a [`client::Client`] and
//! compare `replies()` with the list PostgreSQL would send; then check
//! `msgs()` (what the shard received, probes left out), `committed()` or
//! the pool's counters.

mod client;
mod fake_pg;
mod pool_resize;

use crate::backend::pool::Pool;
use crate::config::Config;
use crate::node::Node;
use crate::session::End;
use client::{Client, DATABASE, USER};
use fake_pg::{Answer, FakePg, Msg};
use std::sync::Arc;

/// A node over `n` fake shards (`s0`, `s1`, …); with two or more, the
/// table `accounts` is sharded by `id` (int8). `extra`: more top-level
/// configuration keys.
async fn node(n: usize, extra: &str) -> (Arc<Node>, Vec<FakePg>) {
    let mut pg = Vec::new();
    for _ in 0..n {
        pg.push(FakePg::start().await);
    }
    let mut toml = format!("listen = \"127.0.0.1:0\"\n{extra}\n");
    for (i, s) in pg.iter().enumerate() {
        toml.push_str(&format!(
            "[[shards]]\nname = \"s{i}\"\ndsn = \"{}\"\n",
            s.dsn()
        ));
    }
    toml.push_str(&format!("[[users]]\nname = \"{USER}\"\nauth = \"trust\"\n"));
    if n > 1 {
        toml.push_str("[[sharded_tables]]\nname = \"accounts\"\nkey = \"id\"\ntype = \"int8\"\n");
    }
    let cfg = Config::from_toml(&toml).expect("test config");
    (Node::new(cfg).expect("node"), pg)
}

fn pool(node: &Arc<Node>, shard: usize) -> Arc<Pool> {
    node.pool_for(shard, DATABASE, USER)
}

/// The shard the router sends `sql` to (no parameters).
fn shard_of(node: &Arc<Node>, sql: &str) -> usize {
    let state = crate::backend::state::SessionState::default();
    let ns = hotrepart_router::route::Namespace::default();
    let ctx = crate::routing::RouteCtx {
        state: &state,
        stale: false,
        server_scs: true,
        ns: &ns,
        enc: crate::wire::encoding::ClientEncoding::Utf8,
    };
    match node.decide(sql, None, &ctx).expect("routed").target {
        crate::routing::Target::Shard(t) => t,
        other => panic!("{sql} goes to {other:?}"),
    }
}

/// Two account ids the router places on different shards: (on s0, on s1).
fn ids_on_each_shard(node: &Arc<Node>) -> (u64, u64) {
    let on = |t: usize| {
        (1..100)
            .find(|id| shard_of(node, &format!("SELECT * FROM accounts WHERE id = {id}")) == t)
            .expect("an id on each shard")
    };
    (on(0), on(1))
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn simple_query_round_trip_and_pooled_backend() {
    let (node, pg) = node(1, "").await;
    pg[0].answer("SELECT 1", Answer::rows(&["one"], &[&["1"]]));
    let mut c = Client::start(&node);
    for _ in 0..2 {
        assert_eq!(
            c.query("SELECT 1").replies().await,
            strs(&[
                "RowDescription(one)",
                "DataRow(1)",
                "CommandComplete(SELECT 1)",
                "ReadyForQuery(I)",
            ])
        );
        // Released at ReadyForQuery('I') with nothing owed.
        assert_eq!(
            (pool(&node, 0).busy_count(), pool(&node, 0).idle_count()),
            (0, 1)
        );
    }
    assert_eq!(
        pg[0].msgs(),
        vec![Msg::Query("SELECT 1".into()), Msg::Query("SELECT 1".into())]
    );
    assert_eq!(
        pg[0].accepted(),
        1,
        "the second query reuses the pooled backend"
    );
    assert!(matches!(c.terminate().await, End::ClientGone));
    assert_eq!(pg[0].open(), 1, "a clean backend stays in the pool");
}

#[tokio::test]
async fn pipelined_extended_batch_is_answered_in_order() {
    let (node, pg) = node(1, "").await;
    pg[0].answer("SELECT $1", Answer::rows(&["v"], &[&["7"]]));
    pg[0].answer("INSERT INTO t VALUES ($1)", Answer::command("INSERT 0 1"));
    let mut c = Client::start(&node);
    c.parse("", "SELECT $1")
        .bind("", "", &["7"])
        .describe_portal("")
        .execute("")
        .parse("", "INSERT INTO t VALUES ($1)")
        .describe_statement("")
        .bind("", "", &["1"])
        .execute("")
        .sync()
        // A second pipeline in the same write.
        .run("SELECT $1", &["7"])
        .sync();
    assert_eq!(
        c.until_ready(2).await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "RowDescription(v)",
            "DataRow(7)",
            "CommandComplete(SELECT 1)",
            "ParseComplete",
            "ParameterDescription(1)",
            "NoData",
            "BindComplete",
            "CommandComplete(INSERT 0 1)",
            "ReadyForQuery(I)",
            "ParseComplete",
            "BindComplete",
            "DataRow(7)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ])
    );
    // Unnamed statements pass through as the client sent them.
    let m = pg[0].msgs();
    assert_eq!(m.len(), 13, "{m:?}");
    assert_eq!(
        m[..2],
        [
            Msg::Parse {
                name: String::new(),
                sql: "SELECT $1".into()
            },
            Msg::Bind {
                portal: String::new(),
                stmt: String::new(),
                params: vec![Some("7".into())]
            },
        ]
    );
    assert_eq!(m[8], Msg::Sync);
    assert_eq!(
        pg[0].committed(),
        ["SELECT $1", "INSERT INTO t VALUES ($1)", "SELECT $1"]
    );
    assert_eq!(pool(&node, 0).busy_count(), 0);
}

#[tokio::test]
async fn named_statements_are_renamed_and_shared_by_sessions() {
    let (node, pg) = node(1, "pool_size = 1").await;
    pg[0].answer("SELECT $1::int", Answer::rows(&["int4"], &[&["5"]]));
    let mut a = Client::start(&node);
    a.parse("s1", "SELECT $1::int")
        .bind("", "s1", &["5"])
        .execute("")
        .sync();
    assert_eq!(
        a.replies().await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "DataRow(5)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ])
    );
    let m = pg[0].msgs();
    let Msg::Parse {
        name: node_name,
        sql,
    } = &m[0]
    else {
        panic!("a Parse first: {m:?}")
    };
    assert!(
        node_name.starts_with("hr_") && node_name != "s1",
        "{node_name}"
    );
    assert_eq!(sql, "SELECT $1::int");
    assert_eq!(
        m[1..],
        [
            Msg::Bind {
                portal: String::new(),
                stmt: node_name.clone(),
                params: vec![Some("5".into())]
            },
            Msg::Execute {
                portal: String::new()
            },
            Msg::Sync
        ]
    );
    let node_name = node_name.clone();
    pg[0].clear_log();
    // Describe of the client's name: under the node's name too.
    a.describe_statement("s1").sync();
    assert_eq!(
        a.replies().await,
        strs(&[
            "ParameterDescription(1)",
            "RowDescription(int4)",
            "ReadyForQuery(I)"
        ])
    );
    assert_eq!(
        pg[0].msgs(),
        vec![
            Msg::Describe {
                kind: 'S',
                name: node_name.clone()
            },
            Msg::Sync
        ]
    );
    pg[0].clear_log();

    // Another session, the same text under another name: the backend
    // (the pool's only one) has it already, no second Parse.
    let mut b = Client::start(&node);
    b.parse("mine", "SELECT $1::int")
        .bind("", "mine", &["6"])
        .execute("")
        .sync();
    assert_eq!(
        b.replies().await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "DataRow(5)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ])
    );
    assert_eq!(
        pg[0].msgs(),
        vec![
            Msg::Bind {
                portal: String::new(),
                stmt: node_name.clone(),
                params: vec![Some("6".into())]
            },
            Msg::Execute {
                portal: String::new()
            },
            Msg::Sync
        ]
    );
    assert_eq!(pg[0].accepted(), 1);
    pg[0].clear_log();

    // A Parse (and Sync) of a statement the pool has parsed is answered
    // by the node without taking a backend.
    let mut c = Client::start(&node);
    c.parse("again", "SELECT $1::int").sync();
    assert_eq!(
        c.replies().await,
        strs(&["ParseComplete", "ReadyForQuery(I)"])
    );
    assert_eq!(pg[0].msgs(), vec![]);
    // Bind runs it under the node's name.
    c.bind("", "again", &["7"]).execute("").sync();
    assert_eq!(c.replies().await.len(), 4);
    assert!(matches!(&pg[0].msgs()[0], Msg::Bind { stmt, .. } if *stmt == node_name));
}

#[tokio::test]
async fn close_of_a_named_statement_is_answered_by_the_node() {
    let (node, pg) = node(1, "").await;
    pg[0].answer("SELECT 2", Answer::rows(&["two"], &[&["2"]]));
    pg[0].answer("SELECT 3", Answer::rows(&["three"], &[&["3"]]));
    let mut c = Client::start(&node);
    c.parse("s1", "SELECT 2").sync();
    assert_eq!(
        c.replies().await,
        strs(&["ParseComplete", "ReadyForQuery(I)"])
    );
    // The node's CloseComplete waits for the ParseComplete the backend
    // owes before it.
    c.parse("s2", "SELECT 3")
        .close_statement("s1")
        .bind("", "s2", &[])
        .execute("")
        .sync();
    assert_eq!(
        c.replies().await,
        strs(&[
            "ParseComplete",
            "CloseComplete",
            "BindComplete",
            "DataRow(3)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ])
    );
    c.close_statement("s2").sync();
    assert_eq!(
        c.replies().await,
        strs(&["CloseComplete", "ReadyForQuery(I)"])
    );
    assert!(
        !pg[0].msgs().iter().any(|m| matches!(m, Msg::Close { .. })),
        "node-named statements stay prepared on the backend: {:?}",
        pg[0].msgs()
    );
    // The client's name is gone: PostgreSQL reports the unknown name, and
    // the name can be prepared again.
    c.bind("", "s1", &[]).execute("").sync();
    assert_eq!(
        c.replies().await,
        strs(&["Error(26000)", "ReadyForQuery(I)"])
    );
    c.parse("s1", "SELECT 2")
        .bind("", "s1", &[])
        .execute("")
        .sync();
    assert_eq!(
        c.replies().await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "DataRow(2)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ])
    );
}

#[tokio::test]
async fn a_begin_waits_for_the_first_statement() {
    let (node, pg) = node(2, "").await;
    pg[0].answer("INSERT INTO t VALUES (1)", Answer::command("INSERT 0 1"));
    let mut c = Client::start(&node);
    assert_eq!(
        c.query("BEGIN").replies().await,
        strs(&["CommandComplete(BEGIN)", "ReadyForQuery(T)"])
    );
    let busy = |i: usize| pool(&node, i).busy_count();
    assert_eq!((busy(0), busy(1)), (0, 0), "no backend for a bare BEGIN");
    assert_eq!(pg[0].msgs(), vec![]);
    assert_eq!(pg[1].msgs(), vec![]);
    // The first statement picks the shard (an undeclared table: the home
    // shard), which begins the transaction first.
    assert_eq!(
        c.query("INSERT INTO t VALUES (1)").replies().await,
        strs(&["CommandComplete(INSERT 0 1)", "ReadyForQuery(T)"])
    );
    assert_eq!(
        pg[0].msgs(),
        vec![
            Msg::Query("BEGIN".into()),
            Msg::Query("INSERT INTO t VALUES (1)".into())
        ]
    );
    assert_eq!(
        (busy(0), busy(1)),
        (1, 0),
        "held while the transaction is open"
    );
    assert_eq!(
        c.query("COMMIT").replies().await,
        strs(&["CommandComplete(COMMIT)", "ReadyForQuery(I)"])
    );
    assert_eq!(pg[0].msgs()[2], Msg::Query("COMMIT".into()));
    assert_eq!(pg[0].committed(), ["INSERT INTO t VALUES (1)"]);
    assert_eq!((busy(0), pool(&node, 0).idle_count()), (0, 1));
    assert_eq!(pg[1].msgs(), vec![]);

    // BEGIN … ROLLBACK with nothing in between never reaches a shard.
    pg[0].clear_log();
    for sql in ["BEGIN", "ROLLBACK"] {
        c.query(sql);
    }
    assert_eq!(
        c.until_ready(2).await,
        strs(&[
            "CommandComplete(BEGIN)",
            "ReadyForQuery(T)",
            "CommandComplete(ROLLBACK)",
            "ReadyForQuery(I)",
        ])
    );
    assert_eq!(pg[0].msgs(), vec![]);
    assert_eq!(pg[1].msgs(), vec![]);
}

#[tokio::test]
async fn a_deferred_begin_goes_to_the_shard_of_the_key() {
    let (node, pg) = node(2, "").await;
    let (_, on1) = ids_on_each_shard(&node);
    let insert = format!("INSERT INTO accounts (id) VALUES ({on1})");
    pg[1].answer(&insert, Answer::command("INSERT 0 1"));
    let mut c = Client::start(&node);
    c.query("BEGIN READ WRITE");
    c.query(&insert);
    c.query("COMMIT");
    assert_eq!(
        c.until_ready(3).await,
        strs(&[
            "CommandComplete(BEGIN)",
            "ReadyForQuery(T)",
            "CommandComplete(INSERT 0 1)",
            "ReadyForQuery(T)",
            "CommandComplete(COMMIT)",
            "ReadyForQuery(I)",
        ])
    );
    // The client's own BEGIN text, replayed on the shard.
    assert_eq!(
        pg[1].msgs(),
        vec![
            Msg::Query("BEGIN READ WRITE".into()),
            Msg::Query(insert.clone()),
            Msg::Query("COMMIT".into())
        ]
    );
    assert_eq!(pg[1].committed(), [insert]);
    assert_eq!(pg[0].msgs(), vec![]);
}

#[tokio::test]
async fn an_error_mid_pipeline_skips_to_sync() {
    let (node, pg) = node(1, "").await;
    pg[0].answer("SELECT 1/0", Answer::error("22012", "division by zero"));
    pg[0].answer("INSERT INTO t VALUES (1)", Answer::command("INSERT 0 1"));
    pg[0].answer("SELECT 2", Answer::rows(&["two"], &[&["2"]]));
    let mut c = Client::start(&node);
    c.run("INSERT INTO t VALUES (1)", &[])
        .run("SELECT 1/0", &[])
        .parse("s2", "SELECT 2")
        .bind("", "s2", &[])
        .execute("")
        .close_statement("s2")
        .sync();
    // As PostgreSQL: the error, then nothing up to Sync (the node's own
    // ParseComplete for s2 and its CloseComplete are skipped too).
    assert_eq!(
        c.replies().await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "CommandComplete(INSERT 0 1)",
            "ParseComplete",
            "BindComplete",
            "Error(22012)",
            "ReadyForQuery(I)",
        ])
    );
    assert_eq!(c.errors, ["division by zero"]);
    assert_eq!(
        pg[0].committed(),
        Vec::<String>::new(),
        "the implicit transaction failed"
    );
    assert_eq!(
        (pool(&node, 0).busy_count(), pool(&node, 0).idle_count()),
        (0, 1)
    );
    // s2 never came to exist: preparing it again is no error, and the
    // session goes on.
    c.parse("s2", "SELECT 2")
        .bind("", "s2", &[])
        .execute("")
        .sync()
        .query("SELECT 2");
    assert_eq!(
        c.until_ready(2).await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "DataRow(2)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
            "RowDescription(two)",
            "DataRow(2)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ])
    );
}

#[tokio::test]
async fn an_error_in_a_transaction_block_fails_it_until_rollback() {
    let (node, pg) = node(1, "").await;
    pg[0].answer("SELECT 1/0", Answer::error("22012", "division by zero"));
    pg[0].answer("SELECT 2", Answer::rows(&["two"], &[&["2"]]));
    let mut c = Client::start(&node);
    for sql in ["BEGIN", "SELECT 1/0", "SELECT 2"] {
        c.query(sql);
    }
    assert_eq!(
        c.until_ready(3).await,
        strs(&[
            "CommandComplete(BEGIN)",
            "ReadyForQuery(T)",
            "Error(22012)",
            "ReadyForQuery(E)",
            "Error(25P02)",
            "ReadyForQuery(E)",
        ])
    );
    assert_eq!(
        pool(&node, 0).busy_count(),
        1,
        "held by the failed transaction"
    );
    // Extended protocol in the failed block.
    c.run("SELECT 2", &[]).sync();
    assert_eq!(
        c.replies().await,
        strs(&["Error(25P02)", "ReadyForQuery(E)"])
    );
    assert_eq!(
        c.query("ROLLBACK").replies().await,
        strs(&["CommandComplete(ROLLBACK)", "ReadyForQuery(I)"])
    );
    assert_eq!(
        (pool(&node, 0).busy_count(), pool(&node, 0).idle_count()),
        (0, 1)
    );
}

#[tokio::test]
async fn a_refusal_of_the_node_mid_batch_skips_to_sync() {
    let (node, pg) = node(1, "").await;
    pg[0].answer("SELECT 2", Answer::rows(&["two"], &[&["2"]]));
    let mut c = Client::start(&node);
    c.parse("s1", "SELECT 2").sync();
    assert_eq!(
        c.replies().await,
        strs(&["ParseComplete", "ReadyForQuery(I)"])
    );
    // A name taken: the node raises 42P05 itself, after the replies owed
    // before it; what follows up to Sync is skipped.
    c.run("SELECT 2", &[])
        .parse("s1", "SELECT 2")
        .bind("", "s1", &[])
        .execute("")
        .sync();
    assert_eq!(
        c.replies().await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "DataRow(2)",
            "CommandComplete(SELECT 1)",
            "Error(42P05)",
            "ReadyForQuery(I)",
        ])
    );
    assert_eq!(c.errors, ["prepared statement \"s1\" already exists"]);
    let m = pg[0].msgs();
    assert_eq!(
        m.iter()
            .filter(|m| matches!(m, Msg::Bind { stmt, .. } if stmt.starts_with("hr_")))
            .count(),
        0,
        "the skipped Bind never reached the shard: {m:?}"
    );
    // The first s1 is intact.
    c.bind("", "s1", &[]).execute("").sync();
    assert_eq!(
        c.replies().await,
        strs(&[
            "BindComplete",
            "DataRow(2)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ])
    );
}

#[tokio::test]
async fn a_routing_refusal_fails_the_batch_before_any_shard_sees_it() {
    let (node, pg) = node(2, "").await;
    let (on0, on1) = ids_on_each_shard(&node);
    pg[0].answer("SELECT 1", Answer::rows(&["one"], &[&["1"]]));
    let mut c = Client::start(&node);
    // A parameter that is no int8: the router's 22P02 at Bind.
    c.run("SELECT * FROM accounts WHERE id = $1", &["abc"])
        .run("SELECT 1", &[])
        .sync();
    assert_eq!(
        c.replies().await,
        strs(&["Error(22P02)", "ReadyForQuery(I)"])
    );
    // Statements for two shards in one pipeline ended by Flush (ended by
    // Sync it would run cut in parts: `transactions::a_pipeline_over_…`).
    c.run("SELECT * FROM accounts WHERE id = $1", &[&on0.to_string()])
        .run("SELECT * FROM accounts WHERE id = $1", &[&on1.to_string()])
        .flush()
        .sync();
    assert_eq!(
        c.replies().await,
        strs(&["Error(0A000)", "ReadyForQuery(I)"])
    );
    assert_eq!(pg[0].msgs(), vec![]);
    assert_eq!(pg[1].msgs(), vec![]);
    // The session goes on.
    assert_eq!(
        c.query("SELECT 1").replies().await,
        strs(&[
            "RowDescription(one)",
            "DataRow(1)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)",
        ])
    );
}

#[tokio::test]
async fn a_backend_is_released_only_when_idle_and_synced() {
    let (node, pg) = node(1, "").await;
    pg[0].answer("SELECT 2", Answer::rows(&["two"], &[&["2"]]));
    let counts = || (pool(&node, 0).busy_count(), pool(&node, 0).idle_count());
    let mut c = Client::start(&node);
    // Flush without Sync: an implicit transaction may be open.
    c.run("SELECT 2", &[]).flush();
    assert_eq!(
        c.read(4).await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "DataRow(2)",
            "CommandComplete(SELECT 1)",
        ])
    );
    assert_eq!(counts(), (1, 0));
    assert_eq!(c.sync().replies().await, strs(&["ReadyForQuery(I)"]));
    assert_eq!(counts(), (0, 1));
    // In a transaction block.
    for sql in ["BEGIN", "SELECT 2"] {
        c.query(sql);
    }
    assert_eq!(
        c.until_ready(2).await.last().map(String::as_str),
        Some("ReadyForQuery(T)")
    );
    assert_eq!(counts(), (1, 0));
    assert_eq!(
        c.query("COMMIT").replies().await,
        strs(&["CommandComplete(COMMIT)", "ReadyForQuery(I)"])
    );
    assert_eq!(counts(), (0, 1));
    assert_eq!(pg[0].accepted(), 1);
    // A client that leaves inside a transaction: its backend is closed,
    // not pooled (PostgreSQL rolls back).
    assert_eq!(
        c.query("BEGIN").replies().await,
        strs(&["CommandComplete(BEGIN)", "ReadyForQuery(T)"])
    );
    assert_eq!(counts(), (1, 0));
    assert!(matches!(c.disconnect().await, End::ClientGone));
    assert_eq!(counts(), (0, 0));
    eventually("the backend closed", || pg[0].open() == 0).await;
}

#[tokio::test]
async fn pipelined_queries_for_two_shards_are_answered_in_order() {
    let (node, pg) = node(2, "").await;
    let (on0, on1) = ids_on_each_shard(&node);
    let q = |id: u64| format!("SELECT * FROM accounts WHERE id = {id}");
    pg[0].answer(&q(on0), Answer::rows(&["id"], &[&[&on0.to_string()]]));
    pg[1].answer(&q(on1), Answer::rows(&["id"], &[&[&on1.to_string()]]));
    let mut c = Client::start(&node);
    // One write: the second waits for the first shard's replies.
    c.query(&q(on1)).query(&q(on0)).query(&q(on1));
    let row = |id: u64| format!("DataRow({id})");
    let one = |id: u64| {
        vec![
            "RowDescription(id)".to_string(),
            row(id),
            "CommandComplete(SELECT 1)".into(),
            "ReadyForQuery(I)".into(),
        ]
    };
    assert_eq!(
        c.until_ready(3).await,
        [one(on1), one(on0), one(on1)].concat()
    );
    assert_eq!(pg[0].msgs(), vec![Msg::Query(q(on0))]);
    assert_eq!(pg[1].msgs(), vec![Msg::Query(q(on1)), Msg::Query(q(on1))]);
    assert_eq!(
        (pool(&node, 0).busy_count(), pool(&node, 1).busy_count()),
        (0, 0)
    );
}

#[tokio::test]
async fn a_commit_ends_the_shard_only_read_first() {
    let (node, pg) = node(2, "").await;
    let (on0, on1) = ids_on_each_shard(&node);
    let read = format!("SELECT * FROM accounts WHERE id = {on1}");
    let write = format!("INSERT INTO accounts (id) VALUES ({on0})");
    pg[1].answer(&read, Answer::rows(&["id"], &[]));
    pg[0].answer(&write, Answer::command("INSERT 0 1"));
    let mut c = Client::start(&node);
    for sql in ["BEGIN", read.as_str(), write.as_str()] {
        c.query(sql);
    }
    assert_eq!(
        c.until_ready(3).await,
        strs(&[
            "CommandComplete(BEGIN)",
            "ReadyForQuery(T)",
            "RowDescription(id)",
            "CommandComplete(SELECT 0)",
            "ReadyForQuery(T)",
            "CommandComplete(INSERT 0 1)",
            "ReadyForQuery(T)",
        ])
    );
    assert_eq!(
        (pool(&node, 0).busy_count(), pool(&node, 1).busy_count()),
        (1, 1)
    );
    assert_eq!(
        c.query("COMMIT").replies().await,
        strs(&["CommandComplete(COMMIT)", "ReadyForQuery(I)"])
    );
    // The read shard's transaction was ended by the node, the written
    // shard's by the client's own COMMIT: one written shard, no 2PC.
    assert_eq!(
        pg[1].msgs(),
        vec![
            Msg::Query("BEGIN".into()),
            Msg::Query(read.clone()),
            Msg::Query("COMMIT".into())
        ]
    );
    assert_eq!(
        pg[0].msgs(),
        vec![
            Msg::Query("BEGIN".into()),
            Msg::Query(write.clone()),
            Msg::Query("COMMIT".into())
        ]
    );
    assert_eq!(pg[0].committed(), [write]);
    for i in 0..2 {
        assert_eq!(
            (pool(&node, i).busy_count(), pool(&node, i).idle_count()),
            (0, 1)
        );
    }
}

#[tokio::test]
async fn settings_follow_the_client_to_whichever_backend_serves_it() {
    let (node, pg) = node(1, "pool_size = 1").await;
    pg[0].answer("SHOW work_mem", Answer::rows(&["work_mem"], &[&["4MB"]]));
    let mut a = Client::start(&node);
    assert_eq!(
        a.query("SET work_mem = '8MB'").replies().await,
        strs(&["CommandComplete(SET)", "ReadyForQuery(I)"])
    );
    // Read back from the backend at the end of the transaction.
    let read_back = |log: &[fake_pg::Received]| {
        log.iter()
            .filter(|r| {
                matches!(&r.msg, Msg::Query(q) if q.starts_with("SELECT name, setting FROM pg_catalog.pg_settings"))
            })
            .count()
    };
    assert_eq!(read_back(&pg[0].log()), 1);
    pg[0].clear_log();
    // Another client on the same (only) backend: its defaults back first.
    let mut b = Client::start(&node);
    assert_eq!(b.query("SHOW work_mem").replies().await.len(), 4);
    assert_eq!(
        pg[0].msgs(),
        vec![
            Msg::Query("RESET ALL".into()),
            Msg::Query("SHOW work_mem".into())
        ]
    );
    pg[0].clear_log();
    // And the first client's setting replayed before its next statement.
    assert_eq!(a.query("SHOW work_mem").replies().await.len(), 4);
    assert_eq!(
        pg[0].msgs(),
        vec![
            Msg::Query("RESET ALL;SELECT pg_catalog.set_config('work_mem','8MB',false)".into()),
            Msg::Query("SHOW work_mem".into())
        ]
    );
    assert_eq!(pg[0].accepted(), 1);
}

/// A refusal of the node in the middle of a pipeline rolls back what the
/// pipeline already ran on the backend, as PostgreSQL's own error would:
/// here a duplicate statement name after an INSERT in the same batch.
#[tokio::test]
async fn a_refusal_of_the_node_rolls_back_what_its_pipeline_ran() {
    let (node, pg) = node(1, "").await;
    pg[0].answer("INSERT INTO t VALUES (1)", Answer::command("INSERT 0 1"));
    pg[0].answer("SELECT 2", Answer::rows(&["two"], &[&["2"]]));
    let mut c = Client::start(&node);
    c.parse("s1", "SELECT 2").sync();
    assert_eq!(
        c.replies().await,
        strs(&["ParseComplete", "ReadyForQuery(I)"])
    );
    c.run("INSERT INTO t VALUES (1)", &[])
        .parse("s1", "SELECT 2")
        .sync();
    assert_eq!(
        c.replies().await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "CommandComplete(INSERT 0 1)",
            "Error(42P05)",
            "ReadyForQuery(I)"
        ])
    );
    assert_eq!(
        pg[0].committed(),
        Vec::<String>::new(),
        "the INSERT of a pipeline that failed was committed: {:?}",
        pg[0].msgs()
    );
}

/// The same for a routing refusal in a later batch of a pipeline whose
/// first batch ended with Flush (2 shards): the node answers the client's
/// Sync itself, and the backend still rolls the INSERT back.
#[tokio::test]
async fn a_routing_refusal_rolls_back_what_its_pipeline_ran() {
    let (node, pg) = node(2, "").await;
    pg[0].answer("INSERT INTO t VALUES (1)", Answer::command("INSERT 0 1"));
    pg[0].answer("SELECT 1", Answer::rows(&["one"], &[&["1"]]));
    let mut c = Client::start(&node);
    c.run("INSERT INTO t VALUES (1)", &[]).flush();
    assert_eq!(
        c.read(3).await,
        strs(&[
            "ParseComplete",
            "BindComplete",
            "CommandComplete(INSERT 0 1)"
        ])
    );
    c.run("SELECT * FROM accounts WHERE id = $1", &["abc"])
        .sync();
    assert_eq!(
        c.replies().await,
        strs(&["Error(22P02)", "ReadyForQuery(I)"])
    );
    assert_eq!(
        c.query("SELECT 1").replies().await,
        strs(&[
            "RowDescription(one)",
            "DataRow(1)",
            "CommandComplete(SELECT 1)",
            "ReadyForQuery(I)"
        ])
    );
    assert_eq!(
        pg[0].committed(),
        vec!["SELECT 1".to_string()],
        "the INSERT of a pipeline that failed was committed: {:?}",
        pg[0].msgs()
    );
}
