// Prefill (batches past the small-item bound, plan.rs) on tensor cores as pipelined streams:
// the shrink streams x and A through a ring of cp.async k-steps, the expand streams y and B
// through a ring of 64-column tiles, so each block keeps several loads in flight instead of one
// dependent trip per step (ncu: the register-staged shrink_tile / expand_tile ran at 10-18 % of
// DRAM bandwidth). Same work items, partial layout and sums as lora_shrink.cu / lora_expand.cu.
// Both take 16-byte copies only: the launcher sends unaligned x / y and Hi or Ho not a multiple
// of 8 to the register-staged kernels. lora_common.cuh is prepended by the loader.

// The ring geometry, copies and fragments: lora_pipe.cuh, prepended by the loader.

// u[t, r..r+3] = sum over the ksplit partials in split order (the serial sum's order, bit for bit),
// 4 ranks a float4, PF_USUM_GROUPS of them a thread at once and the split loop unrolled, so the
// item's last block keeps many partials in flight instead of one u element's chain after another
// (the serial sum was a tail of up to 16 dependent rounds an item at rank 64: prefill-5, run 3).
#define PF_USUM_GROUPS 2
// Items with at most this many u elements (tokens x rank) sum them element by element: one round
// of ksplit loads a thread already keeps them in flight, and the float4 form leaves 3 of 4 threads
// idle (measured on the H200: 2-4 % slower at T = 512 over 32-128 adapters, rank 16; prefill-6).
#define PF_USUM_SERIAL_MAX 512
__device__ __forceinline__ void usum_groups(const float* part, float* u, const int* tokens, int nt, int R, int mr,
                                            int ksplit, long long split_stride) {
    const int rq = R >> 2;
    const int groups = nt * rq;
    for (int g0 = threadIdx.x; g0 < groups; g0 += PF_USUM_GROUPS * LMX_THREADS) {
        long long off[PF_USUM_GROUPS];
        bool in[PF_USUM_GROUPS];
        float4 v[PF_USUM_GROUPS];
#pragma unroll
        for (int q = 0; q < PF_USUM_GROUPS; ++q) {
            const int g = g0 + q * LMX_THREADS;
            in[q] = g < groups;
            off[q] = in[q] ? (long long)tokens[g / rq] * mr + (g % rq) * 4 : 0;
            v[q] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll 8
        for (int c = 0; c < ksplit; ++c) {
#pragma unroll
            for (int q = 0; q < PF_USUM_GROUPS; ++q) {
                if (in[q]) {
                    const float4 a = __ldcg(reinterpret_cast<const float4*>(part + c * split_stride + off[q]));
                    v[q].x += a.x;
                    v[q].y += a.y;
                    v[q].z += a.z;
                    v[q].w += a.w;
                }
            }
        }
#pragma unroll
        for (int q = 0; q < PF_USUM_GROUPS; ++q)
            if (in[q]) *reinterpret_cast<float4*>(u + off[q]) = v[q];
    }
}

// partial[s, c, t, r] as shrink_tile writes it, and u once: the last of an item's ksplit blocks
// to finish (a count in the segments' workspace, left zeroed) sums the item's partials in split
// order into u[s, t, r] (r < rank), right after the partials in the same buffer (the launcher
// sizes it), so the expand reads one u row a token instead of re-summing ksplit partials in every
// column span. Block = (split c, work item, slice s), 8 warps: warp w owns token rows 16*(w&3)..
// and every other 8-wide rank tile from (w>>2). Dynamic shared memory: pf_shrink_stages(WT) x
// (64 + rank rows) x PF_PITCH halves. USUM 1: u element by element (the prefill-5 form, kept
// for A/B runs: `_serial`), else usum_groups where ranks come in fours and the item holds more than
// PF_USUM_SERIAL_MAX u elements (USUM 0) or wherever ranks come in fours (USUM 2: prefill-6's rule,
// `_f4`, for A/B runs). Every form adds the same partials in the same order: bit for bit equal.
#define PF_USUM_RULE 0
#define PF_USUM_SERIAL 1
#define PF_USUM_FLOAT4 2
// WT > 0 (LEAN only): the launch's max rank padded to 16 is 16 WT (the launcher picks the kernel),
// and every item runs WT 8-wide rank tiles a warp, its rows past its own rank zero-filled: the
// tile loops unroll with no per-item count, the ring's offsets are constants (the per-item form
// spent ~280 of its ~350 instructions a k-step a warp on branches and address arithmetic around
// 16 mma at rank 64; ncu at T = 512, 1 block an SM, each issue waiting ~7.6 cycles). Rows past an
// item's rank are summed into tiles that are never stored: the stored sums are the same, bit for bit.
template <bool BF16, int USUM, bool LEAN, int WT = 0>
__device__ void shrink_pipe(const ShrinkArgs& p) {
    constexpr int ST = pf_shrink_stages(WT);
    extern __shared__ __align__(16) unsigned char pf_dyn[];
    __shared__ int tokens[LMX_TILE_T];
    __shared__ int is_last;
    // the per-item kernel's signal word, set by thread 0 beside its count: not a live register across
    // the u sum (deriving it there again made that kernel spill; the rank-tile ones do not)
    __shared__ unsigned* signal_word;
    const int s = blockIdx.z;
    const int c = blockIdx.x;
    if (s >= p.slices.count) return;
    pdl_launch_dependents();
    const int mr = p.table.max_rank;
    float* u = p.partial + (long long)p.slices.count * p.ksplit * p.T * mr;
    int* done = fused_workspace(const_cast<int*>(p.segments), p.max_items, p.T, p.table.num_slots);
    const int module_id = p.slices.module_id[s];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, tq = lane & 3;
    const int mt = warp & 3, nbase = warp >> 2;
    const int k_begin = c * p.kchunk;
    const int k_end = min(p.hi, k_begin + p.kchunk);
    const int nsteps = k_begin < k_end ? (k_end - k_begin + PF_KSTEP - 1) / PF_KSTEP : 0;
    u16* ring = reinterpret_cast<u16*>(pf_dyn);
    const int stage_halves = (LMX_TILE_T + (WT > 0 ? 16 * WT : pf_rank_rows(p.table.max_rank))) * PF_PITCH;
    for (int it = blockIdx.y;; it += gridDim.y) {
        const WorkItem w = pf_item(p.segments, p.max_items, p.T, it, p.merge_items);
        if (w.count == 0) break;
        if (w.count < 0) continue;  // merged into an earlier item's block
        const AdapterEntry e = read_entry(p.table, w.slot, module_id);
        if (e.rank == 0) continue;  // uniform over the block
        const int nt = min(LMX_TILE_T, w.count);
        if (tid < nt) tokens[tid] = w.tokens[tid];
        __syncthreads();
        const int R = e.rank;
        const int ntile8 = WT > 0 ? 2 * WT : (R + 7) >> 3;
        const int nrows_a = ntile8 * 8;
        const bool avec = (reinterpret_cast<u64>(e.a) & 15) == 0;
        // k-step j of x (the item's tokens) and A (its rank rows) into ring stage j % STAGES; one
        // commit group a call, empty past the last step, so the waits below count uniformly.
        // LDSM: this thread's copies are the same rows every k-step (x rows r0 and r0 + 32 of the
        // tile, A rows r0 + 32q, columns cc..cc+7), so their sources and shared offsets are set
        // once an item and a k-step only adds k0: the per-copy index arithmetic was a third of the
        // loop's instructions (ncu, T = 2048 rank 64).
        const int cc0 = (tid & 7) * 8, r0 = tid >> 3;
        const u16* x_row[2];
#pragma unroll
        for (int q = 0; q < 2; ++q)
            x_row[q] = r0 + 32 * q < nt ? p.x + (long long)tokens[r0 + 32 * q] * p.x_stride + k_begin + cc0 : nullptr;
        const u16* a_row = e.a + (long long)r0 * p.hi + k_begin + cc0;
        const long long a_rows32 = 32LL * p.hi;
        const u32 ring_sa = pf_smem_addr(ring);
        // this warp's rank tiles nbase, nbase + 2, ... (< ntile8) by pairs, an ldmatrix a pair:
        // lanes 16..31 name the pair's second tile (the first again where it has none); byte
        // offsets in an A tile, set once an item
        const int b_tiles = WT > 0 ? WT : ntile8 > nbase ? (ntile8 - nbase + 1) / 2 : 0;
        const int b_pairs = (b_tiles + 1) / 2;
        const u32 b_lane = (u32)(((nbase * 8 + (lane & 7)) * PF_PITCH + ((lane >> 3) & 1) * 8) * 2);
        const u32 b_second = (lane & 16) ? 16 * PF_PITCH * 2 : 0;  // two tiles on
        const u32 b_second_last = (b_tiles & 1) ? 0 : b_second;
        auto issue_lean = [&](int j) {
            if (j < nsteps)
                pf_copy_shrink_step<WT>(ring_sa + (u32)((j % ST) * stage_halves * 2), ring + (j % ST) * stage_halves, j * PF_KSTEP,
                                        x_row, a_row, a_rows32, k_begin, k_end, cc0, r0, R, nrows_a, avec, p.x, e.a);
            pf_commit();
        };
        auto issue = [&](int j) {
            if (LEAN) {
                issue_lean(j);
                return;
            }
            if (j < nsteps) {
                u16* xs = ring + (j % ST) * stage_halves;
                u16* as = xs + LMX_TILE_T * PF_PITCH;
                const int k0 = k_begin + j * PF_KSTEP;
#pragma unroll
                for (int q = 0; q < (LMX_TILE_T * 8) / LMX_THREADS; ++q) {
                    const int idx = tid + q * LMX_THREADS;
                    const int r = idx >> 3, cc = (idx & 7) * 8;
                    const bool ok = r < nt && k0 + cc < k_end;
                    pf_cp16(xs + r * PF_PITCH + cc, ok ? p.x + (long long)tokens[r] * p.x_stride + k0 + cc : p.x, ok);
                }
                for (int idx = tid; idx < nrows_a * 8; idx += LMX_THREADS) {
                    const int r = idx >> 3, cc = (idx & 7) * 8;
                    const bool ok = r < R && k0 + cc < k_end;
                    const u16* src = e.a + (long long)r * p.hi + k0 + cc;
                    if (avec) {
                        pf_cp16(as + r * PF_PITCH + cc, ok ? src : e.a, ok);
                    } else {  // an unaligned adapter row: plain loads, visible after the step's barrier
                        u16 v[8];
#pragma unroll
                        for (int i = 0; i < 8; ++i) v[i] = (ok && k0 + cc + i < k_end) ? src[i] : (u16)0;
                        *reinterpret_cast<uint4*>(as + r * PF_PITCH + cc) = pack8(v);
                    }
                }
            }
            pf_commit();
        };
#pragma unroll
        for (int j = 0; j < ST - 1; ++j) issue(j);
        constexpr int NACC = WT > 0 ? 2 * ((WT + 1) / 2) : 8;  // rank tiles a warp holds sums for
        float acc[NACC][4];
#pragma unroll
        for (int i = 0; i < NACC; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
        for (int j = 0; j < nsteps; ++j) {
            pf_wait<ST - 2>();  // step j is in (this thread's copies)
            __syncthreads();                   // everyone's copies; step j-1's stage is free
            issue(j + ST - 1);
            const u16* xs = ring + (j % ST) * stage_halves;
            const u16* as = xs + LMX_TILE_T * PF_PITCH;
            if (LEAN && mt * 16 < nt) {
                pf_mma_shrink_step<BF16, NACC>(acc, ring_sa + (u32)((j % ST) * stage_halves * 2), mt, lane, b_lane, b_pairs, b_tiles,
                                               b_second, b_second_last);
            } else if (mt * 16 < nt) {
#pragma unroll
                for (int kk = 0; kk < PF_KSTEP; kk += 16) {
                    u32 af[4];
                    const int r0 = mt * 16 + gq;
                    af[0] = *reinterpret_cast<const u32*>(xs + r0 * PF_PITCH + kk + tq * 2);
                    af[1] = *reinterpret_cast<const u32*>(xs + (r0 + 8) * PF_PITCH + kk + tq * 2);
                    af[2] = *reinterpret_cast<const u32*>(xs + r0 * PF_PITCH + kk + tq * 2 + 8);
                    af[3] = *reinterpret_cast<const u32*>(xs + (r0 + 8) * PF_PITCH + kk + tq * 2 + 8);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        const int nb = nbase + 2 * i;
                        if (nb < ntile8) {
                            u32 bf[2];
                            bf[0] = *reinterpret_cast<const u32*>(as + (nb * 8 + gq) * PF_PITCH + kk + tq * 2);
                            bf[1] = *reinterpret_cast<const u32*>(as + (nb * 8 + gq) * PF_PITCH + kk + tq * 2 + 8);
                            mma16816<BF16>(acc[i], af, bf);
                        }
                    }
                }
            }
        }
        pf_wait<0>();  // only empty groups are left; the ring is reused by the next item
        float* out = p.partial + ((long long)(s * p.ksplit + c) * p.T) * p.table.max_rank;
#pragma unroll
        for (int i = 0; i < NACC; ++i) {
            const int nb = nbase + 2 * i;
            if (nb < ntile8) {
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    const int row = mt * 16 + gq + ((h & 2) ? 8 : 0);
                    const int r = nb * 8 + tq * 2 + (h & 1);
                    if (row < nt && r < R) out[(long long)tokens[row] * p.table.max_rank + r] = acc[i][h];
                }
            }
        }
        // the item's last split to finish sums the partials (every split's, in split order: the
        // same u whichever block is last). LEAN: the barrier, then one thread's fence before the
        // count (cumulative over the block's writes ordered before it by the barrier: the pattern
        // of cooperative groups' grid sync), not every warp waiting on its own fence (ncu: 7 % of
        // the shrink's stall samples at T = 2048 rank 64).
        if (!LEAN) __threadfence();
        __syncthreads();
        if (tid == 0) {
            if (LEAN) __threadfence();
            int* count = done + LMX_FUSED_WS_WORDS * (s * p.max_items + it);
            if (WT == 0) signal_word = reinterpret_cast<unsigned*>(count + 1);
            const int before = atomicAdd(count, 1);
            is_last = before == p.ksplit - 1;
            if (is_last) *count = 0;  // every split has counted: zeroed for the next launch
        }
        __syncthreads();
        if (is_last) {
            __threadfence();
            const float* part = p.partial + (long long)s * p.ksplit * p.T * mr;
            float* us = u + (long long)s * p.T * mr;
            const bool f4 = USUM == PF_USUM_FLOAT4 || (USUM == PF_USUM_RULE && nt * R > PF_USUM_SERIAL_MAX);
            if (USUM != PF_USUM_SERIAL && f4 && (R & 3) == 0 && (mr & 3) == 0 && (reinterpret_cast<u64>(p.partial) & 15) == 0) {
                usum_groups(part, us, tokens, nt, R, mr, p.ksplit, (long long)p.T * mr);
            } else {
                for (int idx = tid; idx < nt * R; idx += LMX_THREADS) {
                    const int i = idx / R, r = idx % R;
                    const long long t = tokens[i];
                    float v = 0.f;
#pragma unroll 16
                    for (int cc = 0; cc < p.ksplit; ++cc) v += __ldcg(part + cc * (long long)p.T * mr + t * mr + r);
                    us[t * mr + r] = v;
                }
            }
            if (p.signal_items) {
                // u is in: the barrier orders every thread's stores before thread 0's release, which
                // the item's expand blocks acquire (they wrap the word back to zero)
                __syncthreads();
                if (tid == 0) {
                    unsigned* word = WT == 0 ? signal_word
                                             : reinterpret_cast<unsigned*>(done + LMX_FUSED_WS_WORDS * (s * p.max_items + it) + 1);
                    red_inc(word, ~0u, true);
                }
            }
        }
        __syncthreads();  // tokens, is_last and the ring are rewritten by the next item
    }
}

// y[t, off + o] += sum_r u[t, r] B[o, r] (DoRA: y = scale[o] * (y + ...)) with u = the ksplit
// partials summed in split order, rounded to 16 bits (as expand_tile: the same row bit for bit
// whatever the token order). Block = (a span of p.ochunk columns, work item, slice): u is summed
// once for the span, its fragments stay in registers, and the span's 64-column tiles of B and y
// stream through a ring (the first ones in flight before the wait on the shrink). Warp w owns
// token rows 16*(w&3).. and columns 32*(w>>2)..+32 of each tile; the sum goes back into the y
// tile in shared memory, then out in 16-byte stores. Dynamic shared memory: u (64 x rank pitch)
// then STAGES x (B tile 64 x rank pitch, y tile 64 x PF_PITCH) halves.
// WT > 0 (LEAN only): as shrink_pipe's, u and B padded to 16 WT ranks for every item (WT k16 steps
// a tile, zero-filled past the item's rank: exact zeros added, the same sums).
template <bool BF16, int STAGES, bool LEAN, int WT = 0>
__device__ void expand_pipe(const ExpandArgs& p) {
    extern __shared__ __align__(16) unsigned char pf_dyn[];
    __shared__ int tokens[LMX_TILE_T];
    const int s = blockIdx.z;
    if (s >= p.slices.count) return;
    const int module_id = p.slices.module_id[s];
    const int off = p.slices.out_offset[s];
    const int ho = p.slices.out_size[s];
    const int ob = blockIdx.x * p.ochunk;
    if (ob >= ho) return;
    const int ntiles = (min(ho, ob + p.ochunk) - ob + PF_OTILE - 1) / PF_OTILE;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, tq = lane & 3;
    const int mt = warp & 3, nh = warp >> 2;
    const int bpitch = (WT > 0 ? 16 * WT : pf_rank_rows(p.table.max_rank)) + 8;  // halves: conflict-free for every rank
    constexpr int KS = WT > 0 ? WT : EXPAND_PIPE_KSTEPS;                        // k16 steps u holds at most
    constexpr int BQ = WT > 0 ? (PF_OTILE * 2 * WT + LMX_THREADS - 1) / LMX_THREADS : 4;  // B chunks a thread a tile
    u16* us = reinterpret_cast<u16*>(pf_dyn);
    u16* ring = us + LMX_TILE_T * bpitch;
    const int stage_halves = PF_OTILE * bpitch + LMX_TILE_T * PF_PITCH;
    bool waited = false;
    for (int it = blockIdx.y;; it += gridDim.y) {
        const WorkItem w = pf_item(p.segments, p.max_items, p.T, it, p.merge_items);
        if (w.count == 0) break;
        if (w.count < 0) continue;  // merged into an earlier item's block
        const AdapterEntry e = read_entry(p.table, w.slot, module_id);
        const int R = e.rank;
        if (R == 0) continue;  // uniform over the block
        const int nt = min(LMX_TILE_T, w.count);
        if (tid < nt) tokens[tid] = w.tokens[tid];
        __syncthreads();
        const int rk = WT > 0 ? 16 * WT : (R + 15) & ~15;  // K padded to the mma's 16 with zeros
        const int bchunks = rk / 8;
        const bool bvec = (R % 8 == 0) && ((reinterpret_cast<u64>(e.b) & 15) == 0);
        // LDSM: this thread's copies are the same rows and columns of every tile, set once an
        // item: y rows r0 and r0 + 32 at column cc0 (the stores are per warp, below), B chunks tid + 256q as
        // (row, rank) packed in an int (-1: none), so a tile adds o0 and divides nothing.
        const int cc0 = (tid & 7) * 8, r0 = tid >> 3;
        u16* y_row[2];
#pragma unroll
        for (int q = 0; q < 2; ++q)
            y_row[q] = r0 + 32 * q < nt ? p.y + (long long)tokens[r0 + 32 * q] * p.y_stride + off + cc0 : nullptr;
        u64 b_chunks = 0;  // 16 bits a chunk: row (6 bits), rank / 8 (4 bits); 0xffff none
#pragma unroll
        for (int q = 0; q < BQ; ++q) {
            const int idx = tid + q * LMX_THREADS;
            b_chunks |= (u64)(idx < PF_OTILE * bchunks ? (idx / bchunks) | (idx % bchunks) << 6 : 0xffff) << (16 * q);
        }
        const u32 ring_sa = pf_smem_addr(ring);
        auto issue_lean = [&](int j, int stage) {
            if (j < ntiles)
                pf_copy_expand_tile<BQ>(ring_sa + (u32)(stage * stage_halves * 2), ring + stage * stage_halves, ob + j * PF_OTILE,
                                        b_chunks, bpitch, y_row, cc0, r0, e.b, R, ho, bvec, p.y);
            pf_commit();
        };
        // tile j into ring stage `stage` (= j % STAGES, kept by the caller: no division in the loop)
        auto issue = [&](int j, int stage) {
            if (LEAN) {
                issue_lean(j, stage);
                return;
            }
            if (j < ntiles) {
                u16* bs = ring + stage * stage_halves;
                u16* ys = bs + PF_OTILE * bpitch;
                const int o0 = ob + j * PF_OTILE;
                for (int idx = tid; idx < PF_OTILE * bchunks; idx += LMX_THREADS) {
                    const int o = idx / bchunks, r = (idx % bchunks) * 8;
                    const u16* src = e.b + (long long)(o0 + o) * R + r;
                    if (bvec) {
                        const bool ok = o0 + o < ho && r < R;
                        pf_cp16(bs + o * bpitch + r, ok ? src : e.b, ok);
                    } else {  // odd rank or unaligned B: plain loads, visible after the tile's barrier
                        u16 v[8];
#pragma unroll
                        for (int i = 0; i < 8; ++i) v[i] = (o0 + o < ho && r + i < R) ? src[i] : (u16)0;
                        *reinterpret_cast<uint4*>(bs + o * bpitch + r) = pack8(v);
                    }
                }
#pragma unroll
                for (int q = 0; q < (LMX_TILE_T * 8) / LMX_THREADS; ++q) {
                    const int idx = tid + q * LMX_THREADS;
                    const int i = idx >> 3, cc = (idx & 7) * 8;
                    const bool ok = i < nt && o0 + cc < ho;
                    pf_cp16(ys + i * PF_PITCH + cc, ok ? p.y + (long long)tokens[i] * p.y_stride + off + o0 + cc : p.y, ok);
                }
            }
            pf_commit();
        };
#pragma unroll 1  // unrolled, a 5-deep ring's prologue spilled
        for (int j = 0; j < STAGES - 1; ++j) issue(j, j);  // B and y do not depend on the shrink
        if (p.wait_items) {
            // this item's u is summed once its shrink's last split signals (lora_common.cuh): wait
            // on that, not on the whole shrink grid; the slice's spans count in, the last wraps it.
            // u is then read at L2 (the float4 form below: the launcher signals only where it runs),
            // never from an L1 line that another item's block filled before this item's u was in
            if (tid == 0) {
                unsigned* sig = reinterpret_cast<unsigned*>(fused_workspace(const_cast<int*>(p.segments), p.max_items, p.T, p.table.num_slots) +
                                                            LMX_FUSED_WS_WORDS * (s * p.max_items + it) + 1);
                while (ld_acquire(reinterpret_cast<const int*>(sig)) < 1) __nanosleep(32);
                red_inc(sig, (unsigned)((ho + p.ochunk - 1) / p.ochunk), false);
            }
            __syncthreads();
        } else if (!waited) {
            pdl_wait();
            waited = true;
        }
        const int mr = p.table.max_rank;
        if (LEAN && p.ksplit == 1 && (mr & 3) == 0 && (reinterpret_cast<u64>(p.partial) & 15) == 0) {
            // u written once (ksplit 1): a float4 of ranks a load, a thread's loads all in flight
            // before its stores (the element loop was up to 32 dependent trips a thread, a third
            // of the expand's stall samples at T = 2048 rank 64). 0 + v as the loop below adds.
            const float* u = p.partial + (long long)s * p.T * mr;
            const int rq = rk >> 2;
            const int groups = LMX_TILE_T * rq;
            for (int g0 = tid; g0 < groups; g0 += 4 * LMX_THREADS) {
                float4 v[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int g = g0 + q * LMX_THREADS, i = g / rq, r = (g % rq) * 4;
                    v[q] = g < groups && i < nt && r < R ? __ldcg(reinterpret_cast<const float4*>(u + (long long)tokens[i] * mr + r))
                                                         : make_float4(0.f, 0.f, 0.f, 0.f);
                }
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int g = g0 + q * LMX_THREADS, i = g / rq, r = (g % rq) * 4;
                    if (g < groups) {
                        const float w[4] = {v[q].x, v[q].y, v[q].z, v[q].w};
                        u16 h[4];
#pragma unroll
                        for (int c = 0; c < 4; ++c) h[c] = from_f32<BF16>(r + c < R ? 0.f + w[c] : 0.f);
                        *reinterpret_cast<uint2*>(us + i * bpitch + r) = make_uint2(pack2(h[0], h[1]), pack2(h[2], h[3]));
                    }
                }
            }
        } else
        for (int idx = tid; idx < LMX_TILE_T * rk; idx += LMX_THREADS) {
            const int i = idx / rk, r = idx % rk;
            float v = 0.f;
            if (i < nt && r < R) {
                const long long t = tokens[i];
#pragma unroll 16
                for (int c = 0; c < p.ksplit; ++c)
                    v += p.partial[(((long long)s * p.ksplit + c) * p.T + t) * p.table.max_rank + r];
            }
            us[i * bpitch + r] = from_f32<BF16>(v);
        }
        __syncthreads();
        u32 af[KS][4];
        if (LEAN) {  // u rows mt*16 + (lane & 15), columns k*16 + 8 (lane >> 4): a fragment an ldmatrix
            const u32 u_lane = pf_smem_addr(us) + ((mt * 16 + (lane & 15)) * bpitch + (lane >> 4) * 8) * 2;
#pragma unroll
            for (int k = 0; k < KS; ++k)
                if (k * 16 < rk) pf_ldsm4(af[k], u_lane + k * 32);
        } else {
            const int r0 = mt * 16 + gq;
#pragma unroll
            for (int k = 0; k < EXPAND_PIPE_KSTEPS; ++k) {
                if (k * 16 < rk) {
                    af[k][0] = *reinterpret_cast<const u32*>(us + r0 * bpitch + k * 16 + tq * 2);
                    af[k][1] = *reinterpret_cast<const u32*>(us + (r0 + 8) * bpitch + k * 16 + tq * 2);
                    af[k][2] = *reinterpret_cast<const u32*>(us + r0 * bpitch + k * 16 + tq * 2 + 8);
                    af[k][3] = *reinterpret_cast<const u32*>(us + (r0 + 8) * bpitch + k * 16 + tq * 2 + 8);
                }
            }
        }
        for (int j = 0, stage = 0; j < ntiles; ++j, stage = stage + 1 == STAGES ? 0 : stage + 1) {
            pf_wait<STAGES - 2>();
            __syncthreads();  // tile j is in; tile j-1's stage (read by its stores) is free
            issue(j + STAGES - 1, stage == 0 ? STAGES - 1 : stage - 1);
            u16* bs = ring + stage * stage_halves;
            u16* ys = bs + PF_OTILE * bpitch;
            const int o0 = ob + j * PF_OTILE;
            if (mt * 16 < nt) {
                float acc[4][4];
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
                if (LEAN) {
                    pf_mma_expand_tile<BF16, KS>(acc, af, ring_sa + (u32)(stage * stage_halves * 2), nh, lane, bpitch, rk);
                } else
#pragma unroll
                for (int k = 0; k < EXPAND_PIPE_KSTEPS; ++k) {
                    if (k * 16 < rk) {
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const u16* brow = bs + (nh * 32 + i * 8 + gq) * bpitch + k * 16 + tq * 2;
                            u32 bf[2];
                            bf[0] = *reinterpret_cast<const u32*>(brow);
                            bf[1] = *reinterpret_cast<const u32*>(brow + 8);
                            mma16816<BF16>(acc[i], af[k], bf);
                        }
                    }
                }
                // y + delta (DoRA: scaled) back into the y tile. LEAN: every row and column of the
                // tile (the stores skip the rows past nt and columns past ho, whose sums are of
                // zero-filled copies), the scaled form apart (a uniform branch an item, not a
                // predicated scale load issued for every pair)
                if (LEAN && e.scale == nullptr)
                    pf_add_y_tile<BF16>(acc, ys, mt, nh, lane);
                else
                    pf_add_y_tile_scaled<BF16>(acc, ys, mt, nh, lane, nt, o0, ho, e.scale);
                if (LEAN) pf_store_y_warp(ys, p.y, p.y_stride, tokens, off, o0, ho, nt, mt, nh, lane);
            }
            if (LEAN) continue;  // its warps stored their own regions above
            __syncthreads();
#pragma unroll
            for (int q = 0; q < (LMX_TILE_T * 8) / LMX_THREADS; ++q) {
                const int idx = tid + q * LMX_THREADS;
                const int i = idx >> 3, cc = (idx & 7) * 8;
                if (i < nt && o0 + cc < ho)
                    *reinterpret_cast<uint4*>(p.y + (long long)tokens[i] * p.y_stride + off + o0 + cc) =
                        *reinterpret_cast<const uint4*>(ys + i * PF_PITCH + cc);
            }
        }
        pf_wait<0>();
        __syncthreads();  // tokens, u and the ring are rewritten by the next item
    }
    // signalled per item, the block may finish before the shrink grid has: its completion still
    // follows the shrink's, as without the signals
    if (p.wait_items) pdl_wait();
}

// The default kernels take their mma fragments by ldmatrix and their copies from addresses set once
// an item (LEAN); `_lds32` the 32-bit shared loads and per-copy index arithmetic of prefill-5..7,
// kept for A/B runs (`LORAMUX_PIPE_FRAGMENTS=lds32`). Both multiply the same fragments in the same
// order: bit for bit equal.
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_RULE, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_RULE, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_serial(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_SERIAL, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_serial(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_SERIAL, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_f4(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_FLOAT4, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_f4(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_FLOAT4, true>(p); }
// `_w1`..`_w4`: the same sums with the rank tiles fixed at compile time (WT above), for launches
// whose max rank pads to 16, 32, 48, 64 (rust/src/cuda/plan/pipe.rs pipe_shrink_kernel).
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_w1(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_RULE, true, 1>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_w1(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_RULE, true, 1>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_w2(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_RULE, true, 2>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_w2(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_RULE, true, 2>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_w3(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_RULE, true, 3>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_w3(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_RULE, true, 3>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_w4(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_RULE, true, 4>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_w4(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_RULE, true, 4>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_lds32(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_RULE, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_lds32(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_RULE, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_bf16(const ExpandArgs p) { expand_pipe<true, PF_EXPAND_STAGES, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_f16(const ExpandArgs p) { expand_pipe<false, PF_EXPAND_STAGES, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_bf16_w1(const ExpandArgs p) { expand_pipe<true, PF_EXPAND_STAGES, true, 1>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_f16_w1(const ExpandArgs p) { expand_pipe<false, PF_EXPAND_STAGES, true, 1>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_bf16_w2(const ExpandArgs p) { expand_pipe<true, PF_EXPAND_STAGES, true, 2>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_f16_w2(const ExpandArgs p) { expand_pipe<false, PF_EXPAND_STAGES, true, 2>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_bf16_w3(const ExpandArgs p) { expand_pipe<true, PF_EXPAND_STAGES, true, 3>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_f16_w3(const ExpandArgs p) { expand_pipe<false, PF_EXPAND_STAGES, true, 3>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_bf16_w4(const ExpandArgs p) { expand_pipe<true, PF_EXPAND_STAGES, true, 4>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_f16_w4(const ExpandArgs p) { expand_pipe<false, PF_EXPAND_STAGES, true, 4>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_bf16_lds32(const ExpandArgs p) { expand_pipe<true, PF_EXPAND_STAGES, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_f16_lds32(const ExpandArgs p) { expand_pipe<false, PF_EXPAND_STAGES, false>(p); }
