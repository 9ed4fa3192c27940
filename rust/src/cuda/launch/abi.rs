//! The binary interface the launchers share with cuda/lora_common.cuh, as the Rust compiler lays
//! it out: each `#[repr(C)]` argument struct's size, alignment and field offsets, and the numbers
//! the header repeats as macros. tests/test_kernel_abi.py compiles static_asserts of these against
//! the header with NVRTC, so the two sides cannot drift apart unnoticed.

use super::{ExpandArgs, FusedArgs, LoraSlices, LoraTable, MergeArgs, ReduceArgs, SegmentArgs, ShrinkArgs, MAX_SLICES, MERGE_COLS, MODULES, THREADS};
use crate::cache::slot_table::ENTRY_WORDS;
use crate::cuda::plan::{FUSED_WS_WORDS, SEG_HEADER, TILE_T};

/// One `#[repr(C)]` struct: its C name, `sizeof`, `alignof`, and `(C field name, offsetof)` in
/// declaration order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructLayout {
    pub name: &'static str,
    pub size: usize,
    pub align: usize,
    pub fields: Vec<(&'static str, usize)>,
}

/// `layout!(Struct { field, rust_field as CField, ... })`. Every field must be listed: the
/// destructuring pattern (no `..`) makes a field added to the struct but not here a compile error.
macro_rules! layout {
    ($ty:ident { $($field:ident $(as $c:ident)?),* $(,)? }) => {{
        #[allow(dead_code)]
        fn every_field_is_listed(v: &$ty) {
            let $ty { $($field: _),* } = v;
        }
        StructLayout {
            name: stringify!($ty),
            size: std::mem::size_of::<$ty>(),
            align: std::mem::align_of::<$ty>(),
            fields: vec![$((layout!(@c_name $field $($c)?), std::mem::offset_of!($ty, $field))),*],
        }
    }};
    (@c_name $field:ident) => { stringify!($field) };
    (@c_name $field:ident $c:ident) => { stringify!($c) };
}

/// Every kernel argument struct (the kernels take one by value; the launchers pass its bytes).
pub fn struct_layouts() -> Vec<StructLayout> {
    vec![
        layout!(LoraSlices { count, module_id, out_offset, out_size }),
        layout!(LoraTable { layer_base, slot_stride, num_slots, max_rank }),
        layout!(ShrinkArgs { x, x_stride, slot_of_token, segments, partial, t as T, hi, ksplit, kchunk, max_items, split_target, merge_items, signal_items, table, slices }),
        layout!(ExpandArgs { partial, y, y_stride, slot_of_token, segments, t as T, ksplit, ochunk, max_items, hi, split_target, merge_items, wait_items, table, slices }),
        layout!(SegmentArgs { slot_of_token, segments, t as T, num_slots, max_items, chunk }),
        layout!(ReduceArgs { partial, u, slot_of_token, t as T, ksplit, table, slices }),
        layout!(MergeArgs { y, y_stride, delta, delta_stride, slot_of_token, t as T, width, vec, table, slices }),
        layout!(FusedArgs {
            x, x_stride, y, y_stride, segments, partial, t as T, hi, ksplit, kchunk, max_items, col_steps, col_groups, smem_bytes,
            split_target, expand_target, placed_ksplit, placed_kchunk, placed_col_steps, placed_groups,
            table, slices
        }),
    ]
}

/// `(macro name in lora_common.cuh, the value the Rust side uses)`.
pub fn constants() -> Vec<(&'static str, usize)> {
    vec![
        ("LMX_MAX_SLICES", MAX_SLICES),
        ("LMX_MERGE_COLS", MERGE_COLS),
        ("LMX_TILE_T", TILE_T),
        ("LMX_THREADS", THREADS as usize),
        ("LMX_ENTRY_I64", ENTRY_WORDS),
        ("LMX_MODULES", MODULES as usize),
        ("LMX_SEG_HEADER", SEG_HEADER),
        ("LMX_FUSED_WS_WORDS", FUSED_WS_WORDS),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_repr_c_struct_of_the_launchers_is_in_the_table() {
        let source = include_str!("../launch.rs");
        let listed: Vec<&str> = struct_layouts().iter().map(|s| s.name).collect();
        let mut lines = source.lines();
        while let Some(line) = lines.next() {
            if line.trim() != "#[repr(C)]" {
                continue;
            }
            let decl = lines.by_ref().map(str::trim).find(|l| l.contains("struct ")).expect("a struct follows #[repr(C)]");
            let name = decl.split("struct ").nth(1).unwrap().split(|c: char| !c.is_alphanumeric() && c != '_').next().unwrap();
            assert!(listed.contains(&name), "#[repr(C)] struct {name} is missing from abi::struct_layouts()");
        }
    }

    #[test]
    fn offsets_ascend_within_each_struct() {
        for s in struct_layouts() {
            assert!(!s.fields.is_empty(), "{}", s.name);
            assert!(s.fields.windows(2).all(|w| w[0].1 < w[1].1), "{}: {:?}", s.name, s.fields);
            assert!(s.fields.last().unwrap().1 < s.size && s.size % s.align == 0, "{}", s.name);
        }
    }
}
