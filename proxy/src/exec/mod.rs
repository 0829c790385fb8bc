//! Executors of statements that the session does not simply forward to one
//! shard: RUN ON ALL concatenated ([`scatter`]) or merged ([`merge`]),
//! COPY split over the shards ([`copy`]), EXPLAIN through the node
//! ([`explain`]), two-phase commit ([`twopc`]) with its check that unique
//! indexes of sharded tables include the key ([`unique`]); [`multi`] reads
//! the replies of several shards at once.

pub mod copy;
pub mod database;
pub mod decisions;
pub mod explain;
pub mod merge;
pub mod multi;
pub mod scatter;
pub mod twopc;
pub mod unique;
