//! Test harness: starts real PostgreSQL servers and hotrepart nodes for integration tests.
