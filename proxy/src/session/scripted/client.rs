//! The client side of a session under test: a `tokio::io::duplex` stream
//! into [`Session::run`] (no listener, no login: the session starts as
//! after a trust login), frontend messages written by hand, replies read
//! back as short strings ("ParseComplete", "DataRow(1,x)",
//! "CommandComplete(SELECT 1)", "Error(22012)", "ReadyForQuery(I)" …).

use crate::backend::state::SessionState;
use crate::node::{CancelSlot, Node};
use crate::session::{End, Session};
use crate::wire::{self, FrameReader};
use bytes::{BufMut, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

/// The user every session under test runs as (trust in the test config).
pub(crate) const USER: &str = "app";
/// The database every session under test uses.
pub(crate) const DATABASE: &str = "postgres";

/// No reply within this: the test fails, showing what did arrive.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);

pub(crate) struct Client {
    w: WriteHalf<DuplexStream>,
    r: FrameReader<ReadHalf<DuplexStream>>,
    queued: BytesMut,
    session: tokio::task::JoinHandle<End>,
    /// Messages of the ErrorResponses read so far.
    pub(crate) errors: Vec<String>,
}

impl Client {
    /// A session of `node` in transaction pooling, run on its own task.
    pub(crate) fn start(node: &Arc<Node>) -> Client {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let session = Session::new(
            node.clone(),
            FrameReader::new(theirs, 1 << 20),
            DATABASE.into(),
            false,
            SessionState::default(),
            Arc::new(CancelSlot::default()),
            USER.into(),
        );
        let session = tokio::spawn(session.run());
        let (r, w) = tokio::io::split(ours);
        Client {
            w,
            r: FrameReader::new(r, 1 << 20),
            queued: BytesMut::new(),
            session,
            errors: Vec::new(),
        }
    }

    pub(crate) fn query(&mut self, sql: &str) -> &mut Self {
        wire::frame(&mut self.queued, b'Q', |o| wire::put_cstr(o, sql));
        self
    }

    /// Parse without parameter types.
    pub(crate) fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        wire::frame(&mut self.queued, b'P', |o| {
            wire::put_cstr(o, name);
            wire::put_cstr(o, sql);
            o.put_i16(0);
        });
        self
    }

    /// Bind with text parameters and text results.
    pub(crate) fn bind(&mut self, portal: &str, stmt: &str, params: &[&str]) -> &mut Self {
        wire::frame(&mut self.queued, b'B', |o| {
            wire::put_cstr(o, portal);
            wire::put_cstr(o, stmt);
            o.put_i16(0);
            o.put_i16(params.len() as i16);
            for p in params {
                o.put_i32(p.len() as i32);
                o.put_slice(p.as_bytes());
            }
            o.put_i16(0);
        });
        self
    }

    pub(crate) fn describe_statement(&mut self, name: &str) -> &mut Self {
        self.describe(b'S', name)
    }

    pub(crate) fn describe_portal(&mut self, name: &str) -> &mut Self {
        self.describe(b'P', name)
    }

    fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        wire::frame(&mut self.queued, b'D', |o| {
            o.put_u8(kind);
            wire::put_cstr(o, name);
        });
        self
    }

    /// Execute, all rows.
    pub(crate) fn execute(&mut self, portal: &str) -> &mut Self {
        wire::frame(&mut self.queued, b'E', |o| {
            wire::put_cstr(o, portal);
            o.put_i32(0);
        });
        self
    }

    pub(crate) fn close_statement(&mut self, name: &str) -> &mut Self {
        wire::frame(&mut self.queued, b'C', |o| {
            o.put_u8(b'S');
            wire::put_cstr(o, name);
        });
        self
    }

    pub(crate) fn sync(&mut self) -> &mut Self {
        wire::frame(&mut self.queued, b'S', |_| {});
        self
    }

    pub(crate) fn flush(&mut self) -> &mut Self {
        wire::frame(&mut self.queued, b'H', |_| {});
        self
    }

    /// Unnamed Parse, Bind, Execute of `sql` with text `params`.
    pub(crate) fn run(&mut self, sql: &str, params: &[&str]) -> &mut Self {
        self.parse("", sql).bind("", "", params).execute("")
    }

    /// Writes everything queued, in one write.
    pub(crate) async fn send(&mut self) {
        let buf = std::mem::take(&mut self.queued);
        self.w.write_all(&buf).await.expect("write to the session");
        self.w.flush().await.expect("flush to the session");
    }

    /// Sends what is queued and reads the replies up to the first
    /// ReadyForQuery (included).
    pub(crate) async fn replies(&mut self) -> Vec<String> {
        self.until_ready(1).await
    }

    /// Sends what is queued and reads the replies up to the `n`th
    /// ReadyForQuery (included).
    pub(crate) async fn until_ready(&mut self, n: usize) -> Vec<String> {
        self.send().await;
        let mut got = Vec::new();
        let mut ready = 0;
        while ready < n {
            let r = self.next(&got).await;
            ready += usize::from(r.starts_with("ReadyForQuery"));
            got.push(r);
        }
        got
    }

    /// Sends what is queued and reads exactly `n` replies (after a Flush,
    /// when no ReadyForQuery comes).
    pub(crate) async fn read(&mut self, n: usize) -> Vec<String> {
        self.send().await;
        let mut got = Vec::new();
        while got.len() < n {
            let r = self.next(&got).await;
            got.push(r);
        }
        got
    }

    async fn next(&mut self, so_far: &[String]) -> String {
        let f = match tokio::time::timeout(REPLY_DEADLINE, self.r.next()).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => panic!("session closed the connection ({e}) after {so_far:?}"),
            Err(_) => panic!("no reply within {REPLY_DEADLINE:?} after {so_far:?}"),
        };
        let mut b = f.body();
        let cstr = |b: &mut &[u8]| wire::get_cstr(b).unwrap_or("<bad>").to_string();
        match f.tag() {
            b'1' => "ParseComplete".into(),
            b'2' => "BindComplete".into(),
            b'3' => "CloseComplete".into(),
            b'n' => "NoData".into(),
            b'I' => "EmptyQueryResponse".into(),
            b's' => "PortalSuspended".into(),
            b't' => {
                let n = wire::get_i16(&mut b).unwrap_or(-1);
                format!("ParameterDescription({n})")
            }
            b'T' => {
                let n = wire::get_i16(&mut b).unwrap_or(0);
                let mut names = Vec::new();
                for _ in 0..n {
                    names.push(cstr(&mut b));
                    b = b.get(18..).unwrap_or_default();
                }
                format!("RowDescription({})", names.join(","))
            }
            b'D' => {
                let n = wire::get_i16(&mut b).unwrap_or(0);
                let mut vals = Vec::new();
                for _ in 0..n {
                    let len = wire::get_i32(&mut b).unwrap_or(-1);
                    if len < 0 {
                        vals.push("NULL".to_string());
                    } else {
                        let (v, rest) = b.split_at(len as usize);
                        vals.push(String::from_utf8_lossy(v).into_owned());
                        b = rest;
                    }
                }
                format!("DataRow({})", vals.join(","))
            }
            b'C' => format!("CommandComplete({})", cstr(&mut b)),
            b'E' => {
                let (code, msg) = wire::parse_error_fields(f.body());
                self.errors.push(msg);
                format!("Error({code})")
            }
            b'N' => "Notice".into(),
            b'Z' => format!("ReadyForQuery({})", b.first().map_or('?', |&s| s as char)),
            other => format!("Unexpected({})", other as char),
        }
    }

    /// Sends Terminate; returns how the session ended.
    pub(crate) async fn terminate(mut self) -> End {
        wire::frame(&mut self.queued, b'X', |_| {});
        self.send().await;
        tokio::time::timeout(REPLY_DEADLINE, self.session)
            .await
            .expect("the session ends after Terminate")
            .expect("the session task did not panic")
    }

    /// Closes the connection without Terminate; returns how the session
    /// ended.
    pub(crate) async fn disconnect(self) -> End {
        let Client { w, r, session, .. } = self;
        drop((w, r));
        tokio::time::timeout(REPLY_DEADLINE, session)
            .await
            .expect("the session ends when its client goes")
            .expect("the session task did not panic")
    }
}
