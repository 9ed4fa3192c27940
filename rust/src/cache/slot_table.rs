//! The slot table kernels read (docs/internals.md): int64 `[max_slots, num_layers, 19, ENTRY_WORDS]`,
//! entry `[slot, layer, module]` = `ENTRY_FIELDS`, absolute pool addresses. A host
//! mirror is edited and the changed slot's rows are copied to the table through the copier.

use crate::cache::adapter_image::ImageLayout;
use crate::cache::copier::Copier;
use crate::cache::page_allocator::PageRun;
use crate::error::Result;
use crate::modules::NUM_MODULES;

/// The int64 words of one entry `[slot, layer, module]`, in order: the absolute addresses of A,
/// B and the DoRA scales (0 = none) and the rank (0 = the adapter lacks this module-layer). The
/// kernels read the same words (cuda/lora_common.cuh, `read_entry`); Python reads these names.
pub const ENTRY_FIELDS: [&str; 4] = ["a_addr", "b_addr", "scale_addr", "rank"];
pub const ENTRY_WORDS: usize = ENTRY_FIELDS.len();
const A_ADDR: usize = 0;
const B_ADDR: usize = 1;
const SCALE_ADDR: usize = 2;
const RANK: usize = 3;

pub struct SlotTable {
    table_addr: u64,
    max_slots: usize,
    num_layers: usize,
    mirror: Vec<i64>,
}

impl SlotTable {
    /// `table_addr` points at `table_bytes(max_slots, num_layers)` bytes, zeroed, that the caller owns.
    pub fn new(table_addr: u64, max_slots: usize, num_layers: usize) -> SlotTable {
        SlotTable { table_addr, max_slots, num_layers, mirror: vec![0; max_slots * Self::slot_words(num_layers)] }
    }

    pub fn table_bytes(max_slots: usize, num_layers: usize) -> usize {
        max_slots * Self::slot_words(num_layers) * 8
    }

    fn slot_words(num_layers: usize) -> usize {
        num_layers * NUM_MODULES * ENTRY_WORDS
    }

    pub fn max_slots(&self) -> usize {
        self.max_slots
    }

    /// The mirror's entry, as the table will hold it once copies land.
    pub fn entry(&self, slot: usize, layer: usize, module: usize) -> [i64; ENTRY_WORDS] {
        let at = ((slot * self.num_layers + layer) * NUM_MODULES + module) * ENTRY_WORDS;
        self.mirror[at..at + ENTRY_WORDS].try_into().unwrap()
    }

    /// Points `slot` at an adapter placed in `runs` (one per segment) of a pool at `pool_base`.
    pub fn write_slot(&mut self, copier: &mut dyn Copier, slot: usize, image: &ImageLayout, runs: &[PageRun], pool_base: u64) -> Result<()> {
        let words = Self::slot_words(self.num_layers);
        let slot_rows = &mut self.mirror[slot * words..(slot + 1) * words];
        slot_rows.fill(0);
        for (seg, run) in image.segments.iter().zip(runs) {
            let seg_addr = pool_base + (run.start * image.page_bytes) as u64;
            let at = (seg.row.layer * NUM_MODULES + seg.row.module.id() as usize) * ENTRY_WORDS;
            let entry = &mut slot_rows[at..at + ENTRY_WORDS];
            entry[A_ADDR] = seg_addr as i64;
            entry[B_ADDR] = (seg_addr + seg.b_offset as u64) as i64;
            entry[SCALE_ADDR] = seg.scale_offset.map_or(0, |s| (seg_addr + s as u64) as i64);
            entry[RANK] = seg.row.rank as i64;
        }
        self.flush_slot(copier, slot)
    }

    /// Marks every module-layer of `slot` absent in the mirror only. The device copy keeps the old
    /// rows until the slot is next written inside a load batch, which is ordered after released
    /// batches: a kernel still running from one of them never sees its rows change under it.
    pub fn forget_slot(&mut self, slot: usize) {
        let words = Self::slot_words(self.num_layers);
        self.mirror[slot * words..(slot + 1) * words].fill(0);
    }

    fn flush_slot(&mut self, copier: &mut dyn Copier, slot: usize) -> Result<()> {
        let words = Self::slot_words(self.num_layers);
        let rows = &self.mirror[slot * words..(slot + 1) * words];
        // SAFETY: i64 -> bytes view of the mirror; the destination is this slot's rows of the table.
        // The mirror is pageable memory, which cuMemcpyHtoDAsync stages before returning, so
        // editing it afterwards cannot race the copy.
        let bytes = unsafe { std::slice::from_raw_parts(rows.as_ptr() as *const u8, words * 8) };
        unsafe { copier.copy(self.table_addr + (slot * words * 8) as u64, bytes) }
    }
}
