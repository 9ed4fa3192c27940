//! The two-level adapter cache (seed: "LoraCache configuration"): a host tier of packed adapter
//! images and a device tier of fixed-size pages over a caller-owned pool, with the slot table.

pub mod adapter_image;
pub mod copier;
pub mod cuda_copier;
pub mod device_tier;
pub mod host_memory;
pub mod host_pool;
pub mod host_tier;
pub mod id_hash;
pub mod page_allocator;
pub mod served;
pub mod slot_table;
pub mod stats;
pub mod two_level;

pub use served::ServedModules;
pub use copier::{Copier, HostMemcpy, ReleaseTicket};
pub use cuda_copier::{driver_present, CudaCopier};
pub use slot_table::SlotTable;
pub use stats::{CacheStats, StatValue};
pub use two_level::{built_pool_bytes, Acquired, CacheConfig, PoolRegion, PutOutcome, TwoLevelCache};

#[cfg(test)]
mod fused_put_tests;
#[cfg(test)]
mod pool_tests;
#[cfg(test)]
mod tests;
