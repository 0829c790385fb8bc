//! Merging the answers of several shards into the one answer a single
//! PostgreSQL holding all rows would give, for the multi-shard reads the
//! router gave a merge plan (ORDER BY, LIMIT/OFFSET, aggregates, GROUP BY,
//! HAVING, DISTINCT; `hotrepart_router::route::MergePlan`). Design and
//! what is refused: `docs/design/merge.md`.
//!
//! [`exec`]: runs a router merge plan over the shards (simple and
//! extended protocol): a streaming k-way merge, or rows combined by group.
//! [`cursor`]: a cursor over several shards, declared on each and read
//! forward by the node (concatenated, or merged k-way in per-shard
//! batches).
//! `combine`: grouping keys, partial aggregates added up, HAVING, row
//! comparison for ORDER BY, output values.
//! [`binary`]: merged text values in the binary format clients ask for.
//! [`value`]: PostgreSQL's ordering and the arithmetic for combining
//! partial aggregates, on text-format values. Both (and the shards'
//! RowDescription/DataRow decoding) live in the `hotrepart-wire` crate,
//! fuzzed there (`fuzz/fuzz_targets/merge_values.rs`, `backend.rs`).

pub mod binary;
mod combine;
pub mod cursor;
pub mod exec;
mod packed;
pub mod value;
