//! The errors of a session, and the SQLSTATEs the node raises.
//!
//! Every failure a client sees is an ErrorResponse with a real SQLSTATE
//! ([`sqlstate`], PostgreSQL's names from `errcodes.txt`). A statement the
//! node refuses is a [`Refusal`] (an ERROR: the session goes on); a broken
//! client connection or a FATAL is a [`SessionError`] (the session ends).

/// SQLSTATE codes the node raises itself, named as PostgreSQL names them.
pub mod sqlstate {
    /// `25001 active_sql_transaction`.
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
    /// `25P01 no_active_sql_transaction`.
    pub const NO_ACTIVE_SQL_TRANSACTION: &str = "25P01";
    /// `25P02 in_failed_sql_transaction`.
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    /// `25P03 idle_in_transaction_session_timeout`.
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
    /// `0A000 feature_not_supported`.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// `08006 connection_failure`.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// `08007 transaction_resolution_unknown`.
    pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";
    /// `08P01 protocol_violation`.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// `22023 invalid_parameter_value`.
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// `22P03 invalid_binary_representation`.
    pub const INVALID_BINARY_REPRESENTATION: &str = "22P03";
    /// `23502 not_null_violation`.
    pub const NOT_NULL_VIOLATION: &str = "23502";
    /// `23505 unique_violation`.
    pub const UNIQUE_VIOLATION: &str = "23505";
    /// `26000 invalid_sql_statement_name`.
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    /// `34000 invalid_cursor_name`.
    pub const INVALID_CURSOR_NAME: &str = "34000";
    /// `42P03 duplicate_cursor`.
    pub const DUPLICATE_CURSOR: &str = "42P03";
    /// `28000 invalid_authorization_specification`.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    /// `28P01 invalid_password`.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// `42P04 duplicate_database`.
    pub const DUPLICATE_DATABASE: &str = "42P04";
    /// `3D000 invalid_catalog_name` (unknown database).
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// `40001 serialization_failure`: retry the transaction.
    pub const SERIALIZATION_FAILURE: &str = "40001";
    /// `40003 statement_completion_unknown`.
    pub const STATEMENT_COMPLETION_UNKNOWN: &str = "40003";
    /// `42602 invalid_name`.
    pub const INVALID_NAME: &str = "42602";
    /// `42601 syntax_error`.
    pub const SYNTAX_ERROR: &str = "42601";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// `42703 undefined_column`.
    pub const UNDEFINED_COLUMN: &str = "42703";
    /// `42704 undefined_object`.
    pub const UNDEFINED_OBJECT: &str = "42704";
    /// `42P05 duplicate_prepared_statement`.
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    /// `53300 too_many_connections`.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `54000 program_limit_exceeded`.
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const OUT_OF_MEMORY: &str = "53200";
    /// `55000 object_not_in_prerequisite_state`.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// `F0000 config_file_error`.
    pub const CONFIG_FILE_ERROR: &str = "F0000";
    /// `55P02 cant_change_runtime_param`: a configuration change that
    /// needs a restart.
    pub const CANT_CHANGE_RUNTIME_PARAM: &str = "55P02";
    /// `57014 query_canceled`.
    pub const QUERY_CANCELED: &str = "57014";
    /// `57P03 cannot_connect_now`.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `57P05 idle_session_timeout`.
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// `58000 system_error`.
    pub const SYSTEM_ERROR: &str = "58000";
    /// `XX000 internal_error`.
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const DATA_CORRUPTED: &str = "XX001";

    /// A SQLSTATE a shard sent, as `&'static str` (what
    /// [`Refusal`](super::Refusal) carries). Shards answer
    /// with a small fixed set of codes; each distinct valid code is leaked once.
    pub fn intern(code: &str) -> &'static str {
        static CODES: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashSet<&'static str>>,
        > = std::sync::OnceLock::new();
        if code.len() != 5
            || !code
                .bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        {
            return "XX000";
        }
        let mut set = CODES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = set.get(code) {
            return c;
        }
        let c: &'static str = Box::leak(code.to_string().into_boxed_str());
        set.insert(c);
        c
    }
}

/// A statement the node refuses (an ERROR, not FATAL).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    /// How the session may retry the statement by itself.
    pub retry: Retry,
}

/// Whether the session retries a refused statement itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The refusal goes to the client.
    No,
    /// The statement writes to a range frozen for a cut-over: the session
    /// waits for the next routing table and routes it again (until
    /// `freeze_wait_ms`).
    AfterFreeze,
}

impl Refusal {
    pub fn new(code: &'static str, message: String) -> Refusal {
        Refusal {
            code,
            message,
            retry: Retry::No,
        }
    }

    /// `08P01`: a message the node cannot read.
    pub fn protocol(e: impl std::fmt::Display) -> Refusal {
        Refusal::new(
            sqlstate::PROTOCOL_VIOLATION,
            format!("protocol violation: {e}"),
        )
    }

    /// Whether the session waits out a freeze and routes again.
    pub fn frozen(&self) -> bool {
        self.retry == Retry::AfterFreeze
    }

    /// The ErrorResponse that tells the client.
    pub fn to_frame(&self) -> bytes::Bytes {
        let mut e = bytes::BytesMut::new();
        crate::wire::error_response(
            &mut e,
            crate::wire::Severity::Error,
            self.code,
            &self.message,
        );
        e.freeze()
    }
}

/// Why a session ends early.
#[derive(Debug)]
pub enum SessionError {
    /// The client's connection broke (nothing can be told).
    ClientGone,
    /// A FATAL the client is told before the session closes.
    Fatal { code: &'static str, msg: String },
}
