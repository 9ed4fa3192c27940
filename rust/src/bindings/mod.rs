//! PyO3 bindings: translation only (numpy in, typed Python exceptions out). Logic stays in the
//! pure-Rust modules these files wrap.

pub mod adapter;
pub mod cache;
pub mod errors;
pub mod format;
pub mod modules;
pub mod spec;
pub mod tp;
pub mod ops;
