//! User-supplied routing functions, as the router sees them: an id (the
//! content hash of the module) and, once the node has compiled the module,
//! an implementation behind the [`PointFunction`] trait.
//!
//! The router never compiles or runs WebAssembly itself (it stays free of
//! wasmtime): the node compiles each function the catalog names and attaches
//! the implementations to the snapshot
//! ([`RoutingSnapshot::with_functions`](super::RoutingSnapshot::with_functions)),
//! so routing stays synchronous. A table whose function has no attached
//! implementation still routes nothing wrongly: each statement that needs a
//! point of it fails with [`PointError::Unresolved`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::{KeyType, KeyValue};

/// The identity of a user-supplied routing function: the SHA-256 of its
/// binary WebAssembly module. The same module uploaded twice is the same
/// function. The one id type of the catalog: the wasm host
/// (`hotrepart-udf-wasm`, which depends on nothing of ours) hands out the
/// bare 32 bytes, which the node wraps in this type.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionId(pub [u8; 32]);

impl FunctionId {
    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<FunctionId> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(FunctionId(out))
    }

    /// The first 12 hex digits: enough to tell functions apart in messages.
    pub fn short(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for FunctionId {
    /// Lowercase hex, 64 digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FunctionId({self})")
    }
}

/// A compiled routing function: maps a key to its point.
///
/// Implementations must be deterministic (every node computes the same
/// point for the same key, forever) and may fail for one call (a trap,
/// exhausted fuel, …); the failure concerns that call only.
pub trait PointFunction: Send + Sync + fmt::Debug {
    /// The point of `key`, a key of a column of type `key_type`. The key's
    /// own type may be another integer width than `key_type` (a literal or
    /// parameter of another width); the implementation places the value as
    /// the column's type would store it. `Err` carries the reason, written
    /// to be read by a user ("trapped: unreachable", "ran out of fuel …").
    fn point(&self, key_type: KeyType, key: &KeyValue) -> Result<u64, String>;
}

/// The implementations attached to a snapshot, by function id.
///
/// Two sets are equal when they hold implementations for the same ids (the
/// implementations themselves are opaque).
#[derive(Clone, Default)]
pub struct Functions(BTreeMap<FunctionId, Arc<dyn PointFunction>>);

impl Functions {
    /// No implementations.
    pub fn new() -> Functions {
        Functions::default()
    }

    /// The implementation of `id`, if attached.
    pub fn get(&self, id: &FunctionId) -> Option<&Arc<dyn PointFunction>> {
        self.0.get(id)
    }

    /// Attaches (or replaces) the implementation of `id`.
    pub fn insert(&mut self, id: FunctionId, f: Arc<dyn PointFunction>) {
        self.0.insert(id, f);
    }

    /// The ids with an implementation.
    pub fn ids(&self) -> impl Iterator<Item = &FunctionId> {
        self.0.keys()
    }

    /// Whether no implementation is attached.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(FunctionId, Arc<dyn PointFunction>)> for Functions {
    fn from_iter<I: IntoIterator<Item = (FunctionId, Arc<dyn PointFunction>)>>(it: I) -> Self {
        Functions(it.into_iter().collect())
    }
}

impl PartialEq for Functions {
    fn eq(&self, other: &Self) -> bool {
        self.0.keys().eq(other.0.keys())
    }
}

impl Eq for Functions {}

impl fmt::Debug for Functions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The point of a key could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointError {
    /// The table's routing function has no implementation on this node (it
    /// was not compiled, or its module is missing).
    #[error("routing function {} is not loaded on this node", .0.short())]
    Unresolved(FunctionId),
    /// The function failed for this key.
    #[error("routing function {} failed for key {key}: {reason}", .function.short())]
    Call {
        /// The function.
        function: FunctionId,
        /// The key (as PostgreSQL prints it).
        key: String,
        /// The implementation's reason (trap, fuel, memory, bad return).
        reason: String,
    },
}

impl PointError {
    /// The SQLSTATE a client gets. A failure inside the function is
    /// `38000 external_routine_exception` (PostgreSQL's class for an error
    /// raised by an external routine); a function the node could not run at
    /// all is `39000 external_routine_invocation_exception`.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            PointError::Unresolved(_) => "39000",
            PointError::Call { .. } => "38000",
        }
    }
}
