//! The integration tests, in one binary (each test binary links the whole
//! node, wasmtime included: one link instead of one per file). Run one
//! file's tests with a filter, e.g. `cargo nextest run -p hotrepart-tests
//! -E 'test(/^twopc::/)'` or `cargo test -p hotrepart-tests --test it twopc::`.

mod cancel;
mod client_twophase;
mod clients;
mod cluster;
mod cluster_bench;
mod cluster_twopc;
mod cluster_wasm;
mod consistency;
mod console;
mod copy;
mod copy_freeze;
mod dashboard;
mod data_dir;
mod dataplane;
mod ddl;
mod demo;
mod deploy;
mod drivers;
mod faults;
mod fence;
mod hashing;
mod loadtest;
mod login;
mod memory_budget;
mod merge;
mod merge_known_bugs;
mod merge_memory;
mod merge_random;
mod metrics;
mod notify;
mod pool_lifetime;
mod prepared;
mod proxyctl;
mod rebalance;
mod reload;
mod reshard;
mod reshard_bench;
mod reshard_engine;
mod reshard_reads;
mod reshard_verify;
mod reshard_wasm;
mod routing;
mod safety;
mod scripts;
mod session_mode;
mod soak;
mod sql_prepare;
mod temp_tables;
mod tls_auth;
mod transactions;
mod twopc;
mod type_oids;
mod wasm;
