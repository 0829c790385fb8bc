//! Errors: [`Error`] when a module is compiled and validated, [`CallError`]
//! when one routing call fails. Messages are meant for the user who wrote
//! the function; they never contain host addresses or paths.

/// A module was refused by [`Function::compile`](crate::Function::compile).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a valid WebAssembly module (binary or text), or wasmtime could
    /// not compile or instantiate it.
    #[error("invalid routing function: {0}")]
    Invalid(String),
    /// The module imports something; routing functions must have no imports.
    #[error("routing functions may not import anything, this module imports {0}")]
    Imports(String),
    /// A required export is missing.
    #[error("routing function does not export `{0}`")]
    MissingExport(&'static str),
    /// A required export has the wrong kind or signature.
    #[error("export `{name}` must be {expected}, found {found}")]
    WrongExport {
        /// The export's name.
        name: &'static str,
        /// What the ABI requires.
        expected: &'static str,
        /// What the module has.
        found: String,
    },
    /// `hr_abi_version` returned a version this host does not implement.
    #[error(
        "routing function implements ABI version {found}, this host implements version {expected}"
    )]
    AbiVersion {
        /// The module's version.
        found: i32,
        /// The host's version.
        expected: i32,
    },
    /// The trial calls failed: no key type gave a point, one ran out of fuel
    /// or memory, or two calls with the same key disagreed.
    #[error("trial call failed: {0}")]
    TrialCall(String),
}

/// One routing call failed. The failure concerns that call (and its
/// statement) only: the instance is discarded and the next call gets a fresh
/// one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The function trapped (`unreachable`, out-of-bounds access, division
    /// by zero, stack overflow, …).
    #[error("routing function trapped: {0}")]
    Trap(String),
    /// The call used up its fuel (an endless or too long loop).
    #[error("routing function ran out of fuel ({0} units per call)")]
    OutOfFuel(u64),
    /// The function tried to grow its memory past the cap and then failed.
    #[error("routing function exceeded its memory limit ({0} bytes)")]
    MemoryLimit(usize),
    /// The function returned something the ABI does not allow (a key buffer
    /// outside its memory).
    #[error("routing function returned a bad value: {0}")]
    BadReturn(String),
    /// The key is longer than the configured maximum.
    #[error("shard key of {len} bytes is longer than the routing-function limit of {max}")]
    KeyTooLong {
        /// The key's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A fresh instance could not be created (host resources).
    #[error("could not instantiate routing function: {0}")]
    Instantiate(String),
}
