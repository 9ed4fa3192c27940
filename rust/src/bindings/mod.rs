//! PyO3 bindings: translation only (numpy in, typed Python exceptions out). Logic stays in the
//! pure-Rust modules these files wrap.

pub mod cache;
pub mod errors;
pub mod format;
pub mod modules;
pub mod tp;
pub mod ops;
