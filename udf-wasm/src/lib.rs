//! hotrepart-udf-wasm: host for WebAssembly routing functions, not built yet.
//!
//! An empty placeholder until the udf-wasm issue lands, so that the workspace
//! layout of `DESIGN.md` holds.
