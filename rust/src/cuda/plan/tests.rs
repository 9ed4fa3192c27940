use super::*;

#[test]
fn plan_covers_the_reduction_dim() {
    let cases = [(1, 4096, 1, 8), (32, 14336, 3, 64), (64, 576, 2, 4), (2048, 4096, 3, 128), (8192, 1536, 1, 2), (1, 7, 1, 1),
                 (128, 14336, 1, 32), (200, 28672, 2, 32), (65, 65536, 1, 8), (512, 28672, 1, 8)];
    for &(t, hi, s, slots) in &cases {
        // rank 64 takes the pipelined kernels on small items, rank 16 the CUDA-core ones
        for max_rank in [16, 64] {
            let p = plan_shrink_on_host(t, small_items(t, None), None, hi, s, slots, max_rank, &Tuning::default());
            assert!(p.ksplit >= 1 && p.kchunk * p.ksplit >= hi, "{t} {hi}: {p:?}");
            assert!(p.kchunk * (p.ksplit - 1) < hi, "empty split {p:?}");
            if small_items(t, None) {
                // the decode shrink may run any small-item plan (the pipelined one's fallback)
                assert!(p.kchunk <= DECODE_MAX_CHUNK, "{t} {hi} r{max_rank}: {p:?}");
            }
            let granule = if small_items(t, None) && !takes_pipelined(t, small_items(t, None), None, max_rank, &Tuning::default()) { 256 } else { 64 };
            assert!(p.kchunk % granule == 0, "{t} {hi} r{max_rank}: {p:?}");
        }
    }
}

#[test]
fn mid_size_batches_are_cut_by_their_adapter_count() {
    if ["LORAMUX_SMALL_ITEMS_MAX_T", "LORAMUX_ITEMS_BY_ADAPTERS"].iter().any(|v| std::env::var(v).is_ok()) {
        return;
    }
    // unknown adapter count (a captured graph): T alone decides, as before
    assert!(small_items(64, None) && small_items(256, None) && !small_items(257, None));
    // past ITEMS_BY_ADAPTERS_MAX_T tiles whatever the count; decode batches of 16..64 tokens by it
    assert!(!small_items(513, Some(100_000)) && !small_items(2048, Some(512)));
    if std::env::var("LORAMUX_DECODE_TILES").is_err() {
        assert!(!small_items(64, Some(1)) && !small_items(16, Some(1)) && !small_items(64, Some(7)) && small_items(64, Some(8)));
        assert!(small_items(15, Some(1)) && small_items(1, Some(1)) && small_items(32, Some(4)) && !small_items(33, Some(4)));
    }
    assert!(!small_items(256, Some(1)) && !small_items(256, Some(31)) && small_items(256, Some(32)));
    assert!(!small_items(512, Some(48)) && small_items(512, Some(64)) && small_items(300, Some(128)));
    assert!(!small_items(128, Some(15)) && small_items(128, Some(16)) && small_items(65, Some(9)));
    assert!(!small_items(65, Some(0)), "no adapter counts as one");
    // the two layouts of one batch never have one length (a mismatch is caught by it)
    for t in DECODE_TILES_MIN_T..=ITEMS_BY_ADAPTERS_MAX_T {
        for slots in (1..900).step_by(7) {
            assert_ne!(segments_len(t, slots, false), segments_len(t, slots, true), "T{t} slots {slots}");
        }
    }
    assert_eq!(item_tokens(small_items(256, Some(2))), TILE_T);
}

#[test]
fn a_device_sized_split_has_room_for_every_item_count() {
    if ["LORAMUX_DECODE_DEVICE_SPLIT", "LORAMUX_SHRINK_TARGET_BLOCKS", "LORAMUX_FUSED_EXPAND_BLOCKS"].iter().any(|v| std::env::var(v).is_ok()) {
        return;
    }
    let d = Tuning::default();
    // up to 16 tokens the host plans the split (measured), above it the device
    assert_eq!(plan_shrink(16, small_items(16, None), None, 4096, 1, 64, 16, &d).split_target, 0);
    assert_eq!(plan_fused(8, 4096, 4096, 1, 64, &d).expand_target, 0);
    for &(t, hi, s, slots) in &[(17, 4096, 1, 8), (32, 4096, 3, 64), (32, 14336, 1, 33), (64, 576, 2, 4), (64, 4096, 2, 200), (20, 100, 3, 3), (64, 65536, 1, 8)] {
        for max_rank in [16, 64] {
            let p = plan_shrink(t, small_items(t, None), None, hi, s, slots, max_rank, &d);
            assert!(p.split_target > 0 && p.kchunk % 256 == 0 && p.kchunk <= DECODE_MAX_CHUNK, "{p:?}");
            for n in 1..=max_items(t, slots, small_items(t, None)) {
                let q = decode_split(n, s, hi, p.split_target);
                // the device's split covers Hi with no empty split, within the grid and partials
                assert!(q.ksplit * q.kchunk >= hi && q.kchunk * (q.ksplit - 1) < hi, "{n}: {q:?}");
                assert!(q.ksplit <= p.ksplit && q.kchunk <= p.kchunk, "{t} {hi} {s} {slots} n={n}: {q:?} vs {p:?}");
            }
        }
        let outs = vec![hi.max(300); s];
        let f = plan_fused(t, hi, hi.max(300), s, slots, &d);
        assert!(f.expand_target > 0 && f.shrink.split_target > 0);
        // the grid holds every count's blocks; the count the host planned for before is one of them
        let grid = fused_grid_blocks(&f, hi, &outs, max_items(t, slots, small_items(t, None)));
        for n in 1..=max_items(t, slots, small_items(t, None)) {
            let q = decode_split(n, s, hi, f.shrink.split_target);
            let cs = fused_col_steps(hi.max(300).div_ceil(FUSED_COLS), n * s, f.expand_target);
            assert!(n * s * (q.ksplit + fused_col_groups(hi.max(300), cs)) <= grid);
            // the shape the launcher hands the kernel for a count (FusedArgs.placed_*) is that split
            assert_eq!(fused_shape(&f, hi, &outs, n), (q.ksplit, q.kchunk, cs), "{t} {hi} {s} {slots} n={n}");
        }
    }
    // the decode step: 32 one-token items of q|k|v are split as for 32 items, not 16
    let q = decode_split(32, 3, 4096, FUSED_SHRINK_TARGET);
    assert_eq!((q.ksplit, q.kchunk), (4, 1024));
    assert_eq!(split_for(32, true, 4096, 3, 32, FUSED_SHRINK_TARGET, false).ksplit, 6);
    // 8 adapters of 8 tokens over a large table: 16 splits, not 8
    assert_eq!(decode_split(8, 1, 4096, FUSED_SHRINK_TARGET).ksplit, 16);
    assert_eq!(split_for(64, true, 4096, 1, 128, FUSED_SHRINK_TARGET, false).ksplit, 8);
    // an empty input width plans, it does not divide by zero (the launchers then launch nothing)
    for tokens in [1, 32, 64] {
        let p = split_for(tokens, true, 0, 1, 8, FUSED_SHRINK_TARGET, true);
        assert_eq!((p.ksplit, p.kchunk), (1, 256));
    }
}

#[test]
fn only_batches_past_512_tokens_with_ranks_in_fours_signal_their_items() {
    if ["LORAMUX_PIPE_SIGNAL", "LORAMUX_PIPE_FRAGMENTS"].iter().any(|v| std::env::var(v).is_ok()) {
        return;
    }
    assert!(pipe_signals(2048, 16) && pipe_signals(513, 64) && pipe_signals(600, 128));
    assert!(!pipe_signals(512, 16) && !pipe_signals(64, 16) && !pipe_signals(1, 64));
    // ranks not in fours: the expand would read u by plain loads
    assert!(!pipe_signals(2048, 18) && !pipe_signals(2048, 33));
}

#[test]
fn pipelined_kernels_fix_their_rank_tiles_up_to_rank_64() {
    // the kernel's rows (16 a tile pair) are exactly what pipe_shrink_smem / pipe_expand_smem size
    for (max_rank, kernel) in [(1, "_w1"), (16, "_w1"), (17, "_w2"), (32, "_w2"), (48, "_w3"), (49, "_w4"), (64, "_w4"), (65, ""), (128, "")] {
        assert_eq!(pipe_shrink_kernel("bf16", max_rank), format!("lora_prefill_shrink_bf16{kernel}"));
        assert_eq!(pipe_expand_kernel("f16", max_rank), format!("lora_prefill_expand_f16{kernel}"));
        if !kernel.is_empty() {
            assert_eq!(format!("_w{}", pipe_rank_rows(max_rank) / 16), kernel);
        }
    }
}

#[test]
fn pipelined_launches_leave_room_for_static_shared_memory() {
    for max_rank in 1..=128 {
        // the H200 takes both pipelined kernels at every rank, 99 KB parts up to rank 96
        assert!(pipe_smem_fits(pipe_shrink_smem(max_rank), 90) && pipe_smem_fits(pipe_expand_smem(max_rank), 90));
        assert_eq!(pipe_smem_fits(pipe_shrink_smem(max_rank), 86), max_rank <= 96, "rank {max_rank}");
    }
    // 99 KB parts: ranks 97..112 fill the shrink's ring to the byte, the static bytes tip it over
    assert_eq!(pipe_shrink_smem(112), 99 * 1024);
    assert!(!pipe_smem_fits(pipe_shrink_smem(112), 86) && !pipe_smem_fits(pipe_shrink_smem(112), 120));
}

#[test]
fn flat_expand_only_for_multi_slice_decode_of_32_to_64_tokens() {
    if std::env::var("LORAMUX_EXPAND_DECODE").is_ok() {
        return; // forced by the environment: nothing to check
    }
    let d = Tuning::default();
    assert!(decode_expand_is_flat(32, true, None, 3, 16, &d) && decode_expand_is_flat(64, true, None, 2, 16, &d));
    assert!(!decode_expand_is_flat(32, true, None, 1, 16, &d) && !decode_expand_is_flat(16, true, None, 3, 16, &d) && !decode_expand_is_flat(65, true, None, 2, 16, &d));
    // the flat path's shrink splits coarser (on the device: for the same count, a smaller target)
    assert!(plan_shrink_on_host(32, small_items(32, None), None, 4096, 3, 32, 16, &d).ksplit < plan_shrink_on_host(32, small_items(32, None), None, 4096, 1, 32, 16, &d).ksplit);
    if decode_split_from_device(32, &d) {
        assert_eq!((plan_shrink(32, small_items(32, None), None, 4096, 3, 32, 16, &d).split_target, plan_shrink(32, small_items(32, None), None, 4096, 1, 32, 16, &d).split_target), (132, 528));
    }
}

#[test]
fn a_tuning_choice_decides_where_the_path_allows_it() {
    if ["LORAMUX_EXPAND_DECODE", "LORAMUX_EXPAND_OPT", "LORAMUX_EXPAND_TILE_COLS", "LORAMUX_SHRINK_TARGET_BLOCKS"]
        .iter()
        .any(|v| std::env::var(v).is_ok())
    {
        return; // forced by the environment: nothing to check
    }
    let flat = Tuning { expand: Some(ExpandKind::Flat), ..Default::default() };
    let o1w = Tuning { expand: Some(ExpandKind::SmallO1w), ..Default::default() };
    assert!(decode_expand_is_flat(8, true, None, 1, 16, &flat) && !decode_expand_is_flat(128, true, None, 1, 16, &flat));
    assert!(!decode_expand_is_flat(64, true, None, 3, 16, &o1w));
    assert_eq!(expand_variant(&o1w), "1w");
    assert_eq!(expand_tiles_per_block(&Tuning { expand: Some(ExpandKind::TileC4), ..Default::default() }), 4);
    // more target blocks split the reduction finer
    let few = Tuning { shrink_target_blocks: Some(132), ..Default::default() };
    let many = Tuning { shrink_target_blocks: Some(1056), ..Default::default() };
    assert!(plan_shrink_on_host(64, small_items(64, None), None, 4096, 1, 64, 16, &few).ksplit < plan_shrink_on_host(64, small_items(64, None), None, 4096, 1, 64, 16, &many).ksplit);
    if decode_split_from_device(64, &few) {
        assert_eq!(plan_shrink(64, small_items(64, None), None, 4096, 1, 64, 16, &few).split_target, 132);
    }
    // a table entry names the split it was timed with (unless the environment forces one)
    if std::env::var("LORAMUX_DECODE_DEVICE_SPLIT").is_err() {
        let on = Tuning { device_split: Some(true), ..few };
        let off = Tuning { device_split: Some(false), ..few };
        assert_eq!((plan_shrink(16, small_items(16, None), None, 4096, 1, 64, 16, &on).split_target, plan_shrink(64, small_items(64, None), None, 4096, 1, 64, 16, &off).split_target), (132, 0));
        assert_eq!(plan_fused(16, 4096, 4096, 1, 64, &on).shrink.split_target, 132);
    }
    // a decode batch on the pipelined kernels by its adapter count plans as with no table entry
    if std::env::var("LORAMUX_SHRINK_TARGET_BLOCKS").is_err() && std::env::var("LORAMUX_PIPE_SMALL_DECODE").is_err() {
        let fused = Tuning { expand: Some(ExpandKind::FusedStaged), shrink_target_blocks: Some(264), ..Default::default() };
        let plan = |t: &Tuning, n: usize| plan_shrink(64, small_items(64, Some(n)), Some(n), 4096, 1, 64, 64, t);
        assert!(takes_pipelined(64, small_items(64, Some(8)), Some(8), 64, &fused));
        assert_eq!(plan(&fused, 8), plan(&Tuning::default(), 8));
        assert!(!takes_pipelined(64, small_items(64, Some(32)), Some(32), 64, &fused));
        assert_ne!(plan(&fused, 32), plan(&Tuning::default(), 32));
    }
}

#[test]
fn every_expand_kind_parses_from_its_table_name() {
    for k in ExpandKind::ALL {
        assert_eq!(ExpandKind::parse(k.name()), Some(k));
    }
    assert_eq!(ExpandKind::parse("o2"), None);
}

#[test]
fn items_bound_covers_every_mapping() {
    // worst case: every slot used, the counts as uneven as the chunk allows
    for &(t, slots) in &[(1, 1), (7, 3), (64, 1), (64, 128), (65, 2), (2048, 8), (2048, 4096), (100, 3)] {
        let chunk = item_tokens(small_items(t, None));
        let used = slots.min(t);
        // one slot takes the remainder, the others one token each
        let worst = (t - (used - 1)).div_ceil(chunk) + (used - 1);
        assert!(max_items(t, slots, small_items(t, None)) >= worst, "{t} {slots}");
        assert!(max_items(t, slots, small_items(t, None)) <= t.max(1));
        assert_eq!(segments_len(t, slots, small_items(t, None)), SEG_HEADER + 3 * max_items(t, slots, small_items(t, None)) + t + slots + FUSED_WS_WORDS * MAX_SLICES * max_items(t, slots, small_items(t, None)));
    }
}

#[test]
fn fused_plan_covers_every_column_and_fits_shared_memory() {
    if ["LORAMUX_DECODE_FUSED", "LORAMUX_FUSED_EXPAND_BLOCKS", "LORAMUX_SHRINK_TARGET_BLOCKS"].iter().any(|v| std::env::var(v).is_ok()) {
        return; // forced by the environment: nothing to check
    }
    let d = Tuning::default();
    for &(t, hi, ho, s, slots) in &[(1, 4096, 4096, 1, 8), (32, 4096, 14336, 2, 64), (64, 14336, 4096, 1, 200), (5, 100, 37, 3, 3)] {
        let p = plan_fused(t, hi, ho, s, slots, &d);
        assert!(p.col_steps >= 1 && p.col_groups * p.col_steps * FUSED_COLS >= ho, "{p:?}");
        assert!((p.col_groups - 1) * p.col_steps * FUSED_COLS < ho, "an expand block past the slice: {p:?}");
        assert!(p.shrink.kchunk % 256 == 0 && p.shrink.kchunk <= 1024 && p.shrink.ksplit * p.shrink.kchunk >= hi);
    }
    // longer spans where there are many items, one step a block for a single token
    assert!(plan_fused(32, 4096, 14336, 2, 64, &d).col_steps > plan_fused(1, 4096, 14336, 2, 64, &d).col_steps);
    assert_eq!(plan_fused(1, 4096, 4096, 1, 8, &d).col_steps, 1);
    // under the 99 KB a block may take on sm_86/89 (rank 64), and 48 KB up to rank 32
    assert!(fused_smem_bytes(FUSED_MAX_RANK) <= 99 * 1024 && fused_smem_bytes(32) <= 48 * 1024);
    let fused = Tuning { expand: Some(ExpandKind::Fused), ..Default::default() };
    for k in [ExpandKind::Fused3, ExpandKind::FusedStaged, ExpandKind::FusedStaged4] {
        let t = Tuning { expand: Some(k), ..Default::default() };
        assert!(decode_is_fused(8, true, None, 16, &t));
        let p = plan_fused(32, 4096, 4096, 1, 32, &t);
        assert_eq!(p.staged_a, k != ExpandKind::Fused3);
        assert_eq!(p.blocks_per_sm, [None, Some(3), None, Some(4)][[ExpandKind::Fused, ExpandKind::Fused3, ExpandKind::FusedStaged, ExpandKind::FusedStaged4].iter().position(|&x| x == k).unwrap()]);
    }
    assert!(decode_is_fused(64, true, None, 64, &d) && !decode_is_fused(65, true, None, 16, &d) && !decode_is_fused(8, true, None, 128, &fused));
    assert!(!decode_is_fused(8, true, None, 16, &d) && decode_is_fused(8, true, None, 16, &fused));
    // a decode batch cut into tiles (small_items with the count) takes neither decode kernel
    assert!(!decode_is_fused(64, false, None, 16, &fused) && !decode_expand_is_flat(32, false, None, 3, 16, &d));
    assert!(!decode_is_fused(8, true, None, 16, &Tuning { expand: Some(ExpandKind::SmallO1), ..Default::default() }));
    // counted adapters averaging 4+ tokens: the pipelined kernels, a host-planned split, not flat
    if std::env::var("LORAMUX_PIPE_SMALL_DECODE").is_err() {
        assert!(pipe_on_small_items(32, true, Some(8), 64, &d) && takes_pipelined(64, true, Some(16), 16, &fused));
        assert!(!pipe_on_small_items(32, true, Some(9), 64, &d) && !pipe_on_small_items(32, true, None, 64, &d));
        assert!(pipe_on_small_items(16, true, Some(4), 64, &d) && !pipe_on_small_items(15, true, Some(1), 64, &d));
        assert!(!pipe_on_small_items(64, true, Some(4), 128, &d));
        assert!(!decode_is_fused(64, true, Some(16), 16, &fused) && decode_is_fused(64, true, Some(17), 16, &d));
        assert!(!decode_expand_is_flat(64, true, Some(16), 3, 16, &d) && decode_expand_is_flat(64, true, Some(17), 3, 16, &d));
        assert_eq!(plan_shrink(64, true, Some(16), 4096, 3, 64, 16, &d).split_target, 0);
    }
    // past 64 tokens: a counted small-item batch of ranks up to 32 whose adapters average fewer
    // than 4 tokens (past 256 tokens: at most 6), its split sized on the device
    if std::env::var("LORAMUX_FUSED_PAST_DECODE").is_err() {
        assert!(decode_is_fused(512, true, Some(86), 32, &d) && !decode_is_fused(512, true, Some(85), 32, &d));
        assert!(decode_is_fused(257, true, Some(43), 32, &d) && !decode_is_fused(256, true, Some(64), 32, &d));
        assert!(decode_is_fused(255, true, Some(64), 16, &d) && decode_is_fused(65, true, Some(17), 16, &d));
        assert!(!decode_is_fused(65, true, None, 16, &d) && !decode_is_fused(128, true, Some(128), 64, &d));
        assert!(!decode_is_fused(513, true, Some(512), 16, &d) && !decode_is_fused(128, false, Some(128), 16, &d));
        let p = plan_fused(256, 4096, 4096, 1, 128, &d);
        assert!(p.shrink.split_target > 0 && p.shrink.kchunk <= DECODE_MAX_CHUNK);
    }
}

#[test]
fn fused_forms_fit_shared_memory() {
    // A staged: 5 blocks an SM where 768-element chunks (36 KB) or the expand's rank-32 tiles
    // (42 KB) leave room, 4 at 1024-element chunks (48 KB), 3 at rank 64 (74 KB)
    assert_eq!(fused_form_for(16, 768, true, None).blocks_per_sm, 5);
    assert_eq!(fused_form_for(16, 1024, true, None).blocks_per_sm, 4);
    assert_eq!(fused_form_for(32, 512, true, None).blocks_per_sm, 5);
    assert_eq!(fused_form_for(64, 1024, true, None).blocks_per_sm, 3);
    assert_eq!(fused_form_for(16, 1024, true, None).kernel_name("bf16"), "lora_fused_decode_bf16_sa4");
    for r in [1, 8, 16, 24, 32, 33, 48, 64] {
        for kchunk in [256, 512, 768, 1024] {
            let f = fused_form_for(r, kchunk, true, None);
            assert!(f.staged_a && f.a_stages >= 1, "rank {r} chunk {kchunk}: {f:?}");
            assert!(f.smem_bytes >= fused_staged_shrink_smem_bytes(kchunk, f.a_stages));
            assert!(f.smem_bytes >= fused_expand_smem_bytes(r) && f.smem_bytes <= 99 * 1024, "{f:?}");
            assert!(f.blocks_per_sm == 3 || f.blocks_per_sm * (f.smem_bytes + 1024) <= SM_SHARED_BYTES, "{f:?}");
            // a second round of A never costs a block an SM
            let one = fused_expand_smem_bytes(r).max(fused_staged_shrink_smem_bytes(kchunk, 1));
            assert!(f.blocks_per_sm >= FUSED_STAGED_BLOCKS_PER_SM.min(blocks_that_fit(one)).max(3), "{f:?}");
        }
    }
    // rank 32 at 512-element chunks: both rounds of A in flight, 5 blocks an SM
    assert!(fused_form_for(32, 512, true, None).a_stages >= 2);
}

#[test]
fn register_fused_forms_as_measured() {
    let form = |r| fused_form_for(r, 1024, false, None);
    let (r16, r32, r64) = (form(16), form(32), form(64));
    assert_eq!(fused_form_for(16, 768, true, Some(6)).blocks_per_sm, 5);
    assert_eq!((r16.blocks_per_sm, r32.blocks_per_sm, r64.blocks_per_sm), (4, 4, 3));
    assert_eq!(r16.kernel_name("f16"), "lora_fused_decode_f16_m4");
    assert_eq!(r64.kernel_name("f16"), "lora_fused_decode_f16");
    assert_eq!(r64.smem_bytes, fused_smem_bytes(64));
}

#[test]
fn pipelined_prefill_spans_and_shared_memory() {
    if ["LORAMUX_PREFILL", "LORAMUX_EXPAND_TILE_COLS", "LORAMUX_EXPAND_SPAN_TILES"].iter().any(|v| std::env::var(v).is_ok()) {
        return;
    }
    let d = Tuning::default();
    let c4 = Tuning { expand: Some(ExpandKind::TileC4), ..Default::default() };
    let p16 = Tuning { expand: Some(ExpandKind::Pipe16), ..Default::default() };
    assert!(prefill_is_pipelined(&d) && prefill_is_pipelined(&p16) && !prefill_is_pipelined(&c4));
    // a p<N> kind (by its table name) fixes the expand's span at N tiles
    for (name, span) in [("p2", 2), ("p4", 4), ("p6", 6), ("p8", 8), ("p16", 16)] {
        let t = Tuning { expand: ExpandKind::parse(name), ..Default::default() };
        assert_eq!(pipe_expand_tiles(2048, false, &[4096], &t), span, "{name}");
        assert!(pipe_on_small_items(300, true, None, 16, &t) || std::env::var("LORAMUX_PIPE_SMALL").is_ok());
    }
    let plan = plan_shrink(2048, small_items(2048, None), None, 4096, 1, 8, 16, &d);
    // the reduce runs wherever the shrink did not sum u itself: lora_apply asks only when
    // launch::shrink returned no u (the register-staged path, or the pipelined one's fallback)
    assert!(plan.ksplit > 1 && apply_reduces_first(small_items(2048, None), &plan));
    assert!(!apply_reduces_first(small_items(2048, None), &ShrinkPlan { ksplit: 1, kchunk: 4096, split_target: 0 }) && !apply_reduces_first(small_items(200, None), &plan));
    assert_eq!(pipe_expand_tiles(2048, small_items(2048, None), &[4096], &p16), 16);
    // at most 16 splits on the pipelined path (the register-staged one splits to 56 here)
    let pipe = plan_shrink(512, small_items(512, None), None, 14336, 1, 8, 64, &d);
    assert!(pipe.ksplit <= 16 && pipe.ksplit * pipe.kchunk >= 14336 && pipe.kchunk % 64 == 0, "{pipe:?}");
    assert!(plan_shrink(512, small_items(512, None), None, 14336, 1, 8, 64, &c4).ksplit > 16);
    // small items take the pipelined kernels up to rank 64 unless the table says otherwise; decode
    // batches only by their adapter count (none here), never by the table
    if std::env::var("LORAMUX_PIPE_SMALL").is_err() && std::env::var("LORAMUX_PIPE_SMALL_DECODE").is_err() {
        assert!(takes_pipelined(200, small_items(200, None), None, 16, &d) && takes_pipelined(200, small_items(200, None), None, 16, &p16) && !takes_pipelined(64, small_items(64, None), None, 64, &p16));
        assert!(takes_pipelined(200, small_items(200, None), None, 64, &d) && !takes_pipelined(200, small_items(200, None), None, 128, &d));
        let o1 = Tuning { expand: Some(ExpandKind::SmallO1), ..Default::default() };
        assert!(!takes_pipelined(200, small_items(200, None), None, 64, &o1));
        assert!(takes_pipelined(300, small_items(300, None), None, 16, &d) && !takes_pipelined(300, small_items(300, None), None, 16, &c4));
    }
    assert_eq!(pipe_expand_tiles(2048, small_items(2048, None), &[100], &p16), 2); // never past the slice
    for &(t, ho, s) in &[(300, 4096, 1), (2048, 4096, 1), (2048, 14336, 2), (8192, 1024, 3)] {
        let n = pipe_expand_tiles(t, small_items(t, None), &vec![ho; s], &d);
        assert!(n >= 1 && n <= ho.div_ceil(64) && n <= PIPE_MAX_SPAN_TILES, "{t} {ho} {s}: {n}");
    }
    // two blocks an SM fit at every rank the kernels take (227 KB a block on sm_90, 163 on sm_80)
    for r in [1, 16, 64, 128] {
        assert!(2 * (pipe_shrink_smem(r) + 1024) <= SM_SHARED_BYTES && pipe_shrink_smem(r) <= 163 * 1024, "{r}");
        assert!(2 * (pipe_expand_smem(r) + 1024) <= SM_SHARED_BYTES && pipe_expand_smem(r) <= 163 * 1024, "{r}");
    }
    // the shrink's deeper rings (ranks up to 32) keep the 3 blocks an SM of its launch bounds
    for r in [1, 16, 17, 32, 48, 64] {
        assert!(3 * (pipe_shrink_smem(r) + 1024 + PIPE_STATIC_SMEM) <= SM_SHARED_BYTES, "{r}");
    }
    assert_eq!((pipe_shrink_stages(16), pipe_shrink_stages(32), pipe_shrink_stages(64)), (6, 5, 4));
}

#[test]
fn span_rule_reproduces_the_launch_sweep_on_llama_shapes() {
    if ["LORAMUX_EXPAND_SPAN_TILES", "LORAMUX_PIPE_SPAN_RULE", "LORAMUX_SMALL_ITEMS_MAX_T"].iter().any(|v| std::env::var(v).is_ok()) {
        return;
    }
    let d = Tuning::default();
    let (qkv, o, gu) = (&[4096, 1024, 1024][..], &[4096][..], &[14336, 14336][..]);
    // (out sizes, tokens, span): the table's p4 for q|k|v, the old rule's 2 / 8 for one slice
    // and 14 for gate|up at T = 512 (each won its sweep), 14 for the table's p16 at T = 2048
    for &(outs, t, span) in &[(qkv, 512, 4), (qkv, 2048, 4), (o, 512, 2), (o, 2048, 8), (gu, 512, 14), (gu, 2048, 14)] {
        assert_eq!(pipe_expand_tiles(t, small_items(t, None), outs, &d), span, "{outs:?} T{t}");
    }
    // every slice's tiles count: the widest slice x slices gave q|k|v 24 tiles at T = 2048
    assert_eq!((64usize * 32 * 3).div_ceil(PIPE_EXPAND_TARGET_BLOCKS), 24);
    // small items keep prefill-6's rule (its spans were measured there)
    assert_eq!(pipe_expand_tiles(256, small_items(256, None), gu, &d), (224usize * 32 * 2).div_ceil(PIPE_EXPAND_TARGET_BLOCKS));
    for outs in [&[3584, 512, 512][..], &[18944, 18944], &[5120, 1024, 1024], &[13824, 13824], &[100], &[8, 8, 8]] {
        for t in [257, 300, 512, 1000, 2048, 4096, 8192] {
            let n = pipe_expand_tiles(t, small_items(t, None), outs, &d);
            assert!(n >= 1 && n <= PIPE_RULE_MAX_SPAN && n <= outs.iter().max().unwrap().div_ceil(64), "{outs:?} {t}: {n}");
        }
    }
    // small items of one slot merge into a tile only where chosen (A/B runs)
    if std::env::var("LORAMUX_PIPE_MERGE").is_err() {
        assert_eq!((pipe_merge_items(65, small_items(65, None), true), pipe_merge_items(256, small_items(256, None), false)), (1, 1)); // off unless chosen
    }
}

#[test]
fn flat_expand_rows_cover_the_batch() {
    for t in 1..=TILE_T {
        let oc = flat_expand_columns(t);
        assert!(oc >= 16 && 256 % oc == 0, "{t}: {oc}");
        assert!((256 / oc) * 4 >= t, "{t}: {oc} columns leave tokens uncovered");
    }
    assert_eq!(flat_expand_columns(1), 256);
    assert_eq!(flat_expand_columns(32), 32);
    assert_eq!(flat_expand_columns(64), 16);
}
