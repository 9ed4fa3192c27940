// The fused decode apply (T <= 64): shrink and expand of one lora_apply in a single launch, so an
// apply is one kernel with no whole-grid dependency between its halves. The grid is a group of
// ksplit + col_groups blocks per (slice, item) of the step's segments (groups of items the step
// does not have leave at once; every group's would-be shrink blocks come first in the grid).
// Inside a group, roles come by ticket (an atomic counter of the
// group in the segments' fused workspace, lora_common.cuh): the first ksplit blocks to arrive run
// the split-K shrink of the item (the two-kernel path's shrink_decode_item, or its twin below with
// A staged in shared memory, same sums in the same order: the partials are bit for bit the same), the rest expand col_steps x 256 output columns each. An expand block
// copies its first B tiles (cp.async) and y values, then waits on the group's completion count,
// which the shrink blocks bump once their partials are written: it only ever waits on blocks of
// its own group that took smaller tickets, blocks that already run, so no order of block dispatch
// can deadlock it (tickets in arrival order, as in Merrill & Garland, "Single-pass Parallel Prefix
// Scan with Decoupled Look-back", 2016). Then it streams its column steps with the next step's B
// in flight. Both counters wrap to zero once the group is done (atomicInc): no memset node, no
// reset pass, and a captured graph replays as is. lora_common.cuh and lora_shrink_decode.cuh are
// prepended by the loader.

#define FUSED_COLS LMX_THREADS  // output columns of one step: one a thread
#define FUSED_SMEM_HEAD 64      // bytes of dynamic shared memory before the role's buffers

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
// Partials written by other blocks of this launch: read at L2, never from a stale L1 line.
__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// 16-byte chunks of a staged B row: odd, so 8 threads reading their rows hit distinct banks.
__device__ __forceinline__ int fused_row_chunks(int rc) { return (rc / 8) | 1; }

// The fused kernel's shrink with the A rows staged in shared memory (STAGED_A): each lane copies by
// cp.async exactly the 16-byte pieces of A it reads later (lane-private, so no barrier guards A),
// so the loads in flight hold no registers and the block needs far fewer than the register form
// (shrink_decode_item: 8 x 16 bytes of A a lane). Rank rows go in rounds of 16 (a warp's rows r and
// r + 8, as there), up to 4 rounds in flight (as many as the launch's shared memory holds): the
// next rounds land while this one is summed.
// Sums, their order and the stores are shrink_decode_item's: the partials are bit for bit the same.
// Shared memory: tokens (head), x rows at a pitch of kchunk, then stages x 16 x kchunk halves of A.
__device__ __forceinline__ void store_zero16(void* dst) { *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0); }

// Bytes of the staged shrink's shared memory with `stages` rounds of A (rust/src/cuda/plan/fused.rs
// fused_smem_bytes mirrors it); the kernel takes as many stages as the launch's shared memory holds.
__device__ __forceinline__ int staged_a_stages(int smem_bytes, int kchunk) {
    return (smem_bytes - FUSED_SMEM_HEAD - DECODE_TOKENS * kchunk * 2) / (32 * kchunk);
}

template <bool BF16>
__device__ __forceinline__ void shrink_decode_item_staged(const FusedArgs& p, const WorkItem& w, const AdapterEntry& e,
                                                          int k_begin, int k_end, float* out, const int* tokens,
                                                          unsigned char* sm) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kchunk = p.kchunk, P = kchunk >> 8;  // pitch of x rows (halves), passes a round holds room for
    const int passes = (k_end - k_begin + 255) >> 8;
    const int R = e.rank, rounds = (R + 15) >> 4;
    const int stages = min(rounds, min(4, max(1, staged_a_stages(p.smem_bytes, kchunk))));
    u16* xs = reinterpret_cast<u16*>(sm + FUSED_SMEM_HEAD);
    uint4* as = reinterpret_cast<uint4*>(sm + FUSED_SMEM_HEAD + DECODE_TOKENS * kchunk * 2);
    const bool vx = (p.hi % 8 == 0) && (p.x_stride % 8 == 0) && ((reinterpret_cast<u64>(p.x) & 15) == 0);
    const bool va = (p.hi % 8 == 0) && ((reinterpret_cast<u64>(e.a) & 15) == 0);
    // this lane's pieces of round j: rows 16 j + warp + 8 h, passes q, in stage j % stages
    auto piece = [&](int stage, int h, int q) { return as + (((stage * 8 + warp) * 2 + h) * P + q) * 32 + lane; };
    auto stage_round = [&](int j) {
        if (j < rounds) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = 16 * j + warp + 8 * h;
#pragma unroll 4
                for (int q = 0; q < passes; ++q) {
                    uint4* dst = piece(j % stages, h, q);
                    const int k = k_begin + q * 256 + lane * 8;
                    if (row >= R || k >= k_end) {
                        store_zero16(dst);
                    } else if (va && k + 8 <= k_end) {
                        cp_async16(dst, e.a + (long long)row * p.hi + k);
                    } else {
                        u16 v[8];
                        load8(e.a + (long long)row * p.hi, k, k_end, false, v);
                        *dst = pack8(v);
                    }
                }
            }
        }
        cp_async_commit();  // one group a round, empty or not: the waits below count them
    };
    stage_round(0);  // A first: its loads need no token
    const int cnt = min(DECODE_TOKENS, w.count);
    const int per_row = passes * 32;  // 8-element pieces per staged x row
    for (int idx = threadIdx.x; idx < cnt * per_row; idx += LMX_THREADS) {
        const int i = idx / per_row, k = (idx - i * per_row) * 8;
        u16* dst = xs + i * kchunk + k;
        const u16* row = p.x + (long long)tokens[i] * p.x_stride;
        if (vx && k_begin + k + 8 <= k_end) {
            cp_async16(dst, row + k_begin + k);
        } else {
            u16 v[8];
            load8(row, k_begin + k, k_end, false, v);
            *reinterpret_cast<uint4*>(dst) = pack8(v);
        }
    }
    cp_async_commit();
    for (int j = 1; j < stages; ++j) stage_round(j);
    for (int j = 0; j < rounds; ++j) {
        // groups committed: A0, x, then one a round from round 1: round j's is in when all but the
        // newest stages - 1 are
        switch (stages) {
            case 1: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
            case 2: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
            case 3: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
            default: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
        }
        if (j == 0) __syncthreads();  // every thread's x copies (A is lane-private)
        const int r = 16 * j + warp;
        if (r < R) {
            // tokens in pairs, passes outer: a lane reads each A piece once a pair (not once a
            // token), and each token's sums still take the passes in order, as in shrink_decode_item.
            // The pass loop stays rolled (48 registers at 5 blocks an SM); measured on the H200 it
            // serializes the shared-memory reads of 1-2-token items (docs/kernel-notes.md, decode5)
            for (int i0 = 0; i0 < cnt; i0 += 2) {
                float sum0[2], sum1[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) sum0[i] = sum1[i] = 0.f;
#pragma unroll 1
                for (int q = 0; q < passes; ++q) {
                    {
                        const uint4 a0 = *piece(j % stages, 0, q), a1 = *piece(j % stages, 1, q);
#pragma unroll
                        for (int i = 0; i < 2; ++i) {
                            if (i0 + i < cnt) {
                                const uint4 xv = *reinterpret_cast<const uint4*>(&xs[(i0 + i) * kchunk + q * 256 + lane * 8]);
                                sum0[i] += dot8<BF16>(a0, xv);
                                sum1[i] += dot8<BF16>(a1, xv);
                            }
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    if (i0 + i < cnt) {
#pragma unroll
                        for (int off = 16; off > 0; off >>= 1) {
                            sum0[i] += __shfl_xor_sync(0xffffffffu, sum0[i], off);
                            sum1[i] += __shfl_xor_sync(0xffffffffu, sum1[i], off);
                        }
                        const long long base = (long long)tokens[i0 + i] * p.table.max_rank;
                        if (lane == 0) out[base + r] = sum0[i];
                        if (lane == 1 && r + 8 < R) out[base + r + 8] = sum1[i];
                    }
                }
            }
        }
        // this lane read its pieces of stage j % stages: round j + stages may land there (the
        // shuffles above kept the warp together; the pieces are the lane's own)
        stage_round(j + stages);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
}

template <bool BF16, bool STAGED_A>
__device__ __forceinline__ void fused_shrink(const FusedArgs& p, const WorkItem& w, const AdapterEntry& e,
                                             unsigned* done, unsigned wrap, int s, int c, int kchunk, unsigned char* sm) {
    if (e.rank > 0) {  // uniform over the block
        const int k_begin = c * kchunk;
        const int k_end = min(p.hi, k_begin + kchunk);
        float* out = p.partial + ((long long)(s * p.ksplit + c) * p.T) * p.table.max_rank;
        if (STAGED_A) {
            shrink_decode_item_staged<BF16>(p, w, e, k_begin, k_end, out, reinterpret_cast<const int*>(sm), sm);
        } else {
            shrink_decode_item<BF16>(p.x, p.x_stride, p.hi, p.table.max_rank, w, e, k_begin, k_end, out,
                                     reinterpret_cast<const int*>(sm), reinterpret_cast<u16*>(sm + FUSED_SMEM_HEAD));
        }
    }
    // publish: the barrier orders every thread's partial stores before thread 0's release, which
    // carries them to the waiting expand blocks (cumulativity); fire and forget, nothing waits here
    __syncthreads();
    if (threadIdx.x == 0) red_inc(done, wrap, true);
}

// Waits until the item's ksplit shrink blocks have counted in, then counts this block in too.
__device__ __forceinline__ void fused_wait(unsigned* done, unsigned wrap, int ksplit) {
    if (threadIdx.x == 0) {
        while (ld_acquire(reinterpret_cast<const int*>(done)) < ksplit) __nanosleep(32);
        red_inc(done, wrap, false);  // past its last reader the count wraps to 0
    }
    __syncthreads();
}

// NT: the most tokens the item can have (1, 2 or DECODE_TOKENS; fused_decode picks the least that
// holds w.count; a bound of 4 measured no faster than 8 on the H200, kernel-notes s13). The token
// loops below unroll to NT, not to DECODE_TOKENS: each token slot past the item's count still
// issued its predicated address arithmetic, load and sums (ncu, SASS of the decode step's q|k|v
// apply: one-token items spent ~40 % of the expand's instructions on the seven empty slots).
// NT <= 2 also keeps each token's y row address in a register instead of re-reading the token from
// shared memory for every load and store. Same sums in the same order per token: rows are bit for
// bit those of every NT.
template <bool BF16, int NT>
__device__ __forceinline__ void fused_expand(const FusedArgs& p, const WorkItem& w, const AdapterEntry& e,
                                             unsigned* done, unsigned wrap, int s, int g, int ksplit, int col_steps,
                                             unsigned char* sm) {
    static_assert(NT >= 1 && NT <= DECODE_TOKENS, "NT: tokens an item holds at most");
    constexpr bool ROW_PTRS = NT <= 2;
    const int off = p.slices.out_offset[s], ho = p.slices.out_size[s];
    const int o0 = g * col_steps * FUSED_COLS;  // < ho: a slice has only the groups it needs
    const int R = e.rank;
    if (R == 0) {  // nothing to add; the count still needs this block
        fused_wait(done, wrap, ksplit);
        return;
    }
    const int nt = min(DECODE_TOKENS, w.count);
    const int rc = (R + 7) & ~7, nq = rc / 8;
    const int pitch = fused_row_chunks(rc) * 8;  // halves
    const int rc_max = (p.table.max_rank + 7) & ~7;
    int* tokens = reinterpret_cast<int*>(sm);
    float* su = reinterpret_cast<float*>(sm + FUSED_SMEM_HEAD);
    u16* bs = reinterpret_cast<u16*>(sm + FUSED_SMEM_HEAD + DECODE_TOKENS * rc_max * 4);
    const int o_end = min(ho, o0 + col_steps * FUSED_COLS);
    const int nsteps = (o_end - o0 + FUSED_COLS - 1) / FUSED_COLS;
    const bool vec = (R % 8 == 0) && ((reinterpret_cast<u64>(e.b) & 15) == 0);
    // B rows of step j into stage j & 1: one contiguous run of ncols * R halves of B
    auto stage = [&](int j) {
        if (j < nsteps) {
            const int c0 = o0 + j * FUSED_COLS;
            const int ncols = min(FUSED_COLS, o_end - c0);
            u16* dst = bs + (j & 1) * FUSED_COLS * pitch;
            const u16* src = e.b + (long long)c0 * R;
            for (int idx = threadIdx.x; idx < ncols * nq; idx += LMX_THREADS) {
                const int col = idx / nq, q = idx - col * nq;
                if (vec) {
                    cp_async16(dst + col * pitch + q * 8, src + (long long)idx * 8);
                } else {
                    u16 v[8];
                    load8(src + (long long)col * R, q * 8, R, false, v);
                    *reinterpret_cast<uint4*>(dst + col * pitch + q * 8) = pack8(v);
                }
            }
        }
        cp_async_commit();  // one group a step, empty or not: the wait below counts them
    };
    stage(0);
    stage(1);  // tokens: staged and published by fused_decode's prologue
    // y row of token slot t (from column off), set once a block where NT allows the registers
    u16* yrow[ROW_PTRS ? NT : 1];
#pragma unroll
    for (int t = 0; t < (ROW_PTRS ? NT : 1); ++t)
        yrow[t] = p.y + (t < nt ? (long long)tokens[t] * p.y_stride + off : 0);
    auto y_at = [&](int t, int o) -> u16* {
        return ROW_PTRS ? yrow[ROW_PTRS ? t : 0] + o : p.y + (long long)tokens[t] * p.y_stride + off + o;
    };
    u16 yv[NT], yn[NT];
    u16 sv = 0, sn = 0;
    auto load_y = [&](int j, u16* yo, u16& so) {
        const int o = o0 + j * FUSED_COLS + threadIdx.x;
        const bool live = j < nsteps && o < o_end;
#pragma unroll
        for (int t = 0; t < NT; ++t) yo[t] = (live && (NT == 1 || t < nt)) ? *y_at(t, o) : (u16)0;
        so = (live && e.scale) ? e.scale[o] : (u16)0;
    };
    load_y(0, yv, sv);  // y does not depend on the shrink: in flight during the wait
    fused_wait(done, wrap, ksplit);
    // u = the item's partials summed over the splits (same order as the two-kernel expand)
    const float* part = p.partial + (long long)s * p.ksplit * p.T * p.table.max_rank;
    for (int idx = threadIdx.x; idx < nt * rc; idx += LMX_THREADS) {
        const int i = NT == 1 ? 0 : idx / rc, r = idx - i * rc;
        float v = 0.f;
        if (r < R) {
            const long long t = tokens[i];
#pragma unroll 16
            for (int c = 0; c < ksplit; ++c) v += ld_cg(part + ((long long)c * p.T + t) * p.table.max_rank + r);
        }
        su[i * rc + r] = v;
    }
    for (int j = 0; j < nsteps; ++j) {
        cp_async_wait1();  // every group but the newest is in: step j's tile
        __syncthreads();   // ... for every thread's copies (and su, the first time)
        load_y(j + 1, yn, sn);
        const int o = o0 + j * FUSED_COLS + threadIdx.x;
        if (o < o_end) {
            const u16* brow = bs + (j & 1) * FUSED_COLS * pitch + threadIdx.x * pitch;
            float acc[NT];
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[t] = 0.f;
            for (int q = 0; q < nq; ++q) {
                u16 bv[8];
                unpack8(*reinterpret_cast<const uint4*>(brow + q * 8), bv);
                float bf[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) bf[k] = to_f32<BF16>(bv[k]);
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    if (NT == 1 || t < nt) {
                        const float* ur = su + t * rc + q * 8;
#pragma unroll
                        for (int k = 0; k < 8; ++k) acc[t] += ur[k] * bf[k];
                    }
                }
            }
            const float sc = to_f32<BF16>(sv);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (NT == 1 || t < nt) {
                    float v = to_f32<BF16>(yv[t]) + acc[t];
                    if (e.scale) v *= sc;
                    *y_at(t, o) = from_f32<BF16>(v);
                }
            }
        }
        __syncthreads();  // stage j & 1 is read: step j + 2 may land in it
        stage(j + 2);
#pragma unroll
        for (int t = 0; t < NT; ++t) yv[t] = yn[t];
        sv = sn;
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
}

// Expand blocks of slice s for one item: its column span in col_steps x 256-column groups.
__device__ __forceinline__ int fused_col_groups(const FusedArgs& p, int s, int col_steps) {
    return ((p.slices.out_size[s] + FUSED_COLS - 1) / FUSED_COLS + col_steps - 1) / col_steps;
}

// How the launch's blocks are shared out for `items` items of the step: ksplit shrink blocks and
// fused_col_groups expand blocks per (slice, item). Host-planned (split_target 0), or sized from
// the item count (the split by decode_split, the column steps so about expand_target expand
// blocks run; rust/src/cuda/plan/fused.rs fused_grid_blocks and fused_col_steps mirror it).
struct FusedShape {
    int items;
    int ksplit;
    int kchunk;
    int col_steps;
};
__device__ __forceinline__ FusedShape fused_shape(const FusedArgs& p, int items) {
    FusedShape f;
    f.items = items;
    f.ksplit = p.ksplit;
    f.kchunk = p.kchunk;
    f.col_steps = p.col_steps;
    if (p.split_target <= 0) return f;
    const DecodeSplit d = decode_split(items, p.slices.count, p.hi, p.split_target);
    // the host sized the partials (ksplit) and the staged x rows (kchunk) for every count; a
    // launch that did not keeps its planned split rather than overrun them
    if (d.ksplit <= p.ksplit && d.kchunk <= p.kchunk) {
        f.ksplit = d.ksplit;
        f.kchunk = d.kchunk;
    }
    int widest = 0;
    for (int s = 0; s < p.slices.count; ++s) widest = max(widest, p.slices.out_size[s]);
    const int units = max(1, (widest + FUSED_COLS - 1) / FUSED_COLS);
    const int pairs = max(1, items * p.slices.count);
    f.col_steps = min(units, max(1, (units * pairs + p.expand_target - 1) / max(1, p.expand_target)));
    return f;
}

// The shape and the placement for max_items items as the host computed them (FusedArgs.placed_*:
// fused_shape's result for that count, each slice's expand blocks an item): a block's first trip
// needs no arithmetic of its own. Measured on the H200 (globaltimer a block, the decode step's
// q|k|v apply, kernel-notes s13): computing them here took ~1.2 us from a block's start to its
// first load, the ksplit and column-step divisions and the slice loops, on the path of every block
// of both waves of the grid.
__device__ __forceinline__ FusedShape fused_placed_shape(const FusedArgs& p) {
    FusedShape f;
    f.items = p.max_items;
    f.ksplit = p.placed_ksplit;
    f.kchunk = p.placed_kchunk;
    f.col_steps = p.placed_col_steps;
    return f;
}

// Expand blocks per item of slice s in the shape: the host's figure for the placed shape (the only
// one with max_items items), computed for a shape the device sized from a smaller count.
__device__ __forceinline__ int fused_groups(const FusedArgs& p, const FusedShape& f, int s) {
    return f.items == p.max_items ? p.placed_groups[s] : fused_col_groups(p, s, f.col_steps);
}

// Block b -> (slice, item) for the shape: the first S * items * ksplit blocks are ksplit per
// (slice, item), the rest fused_groups(s) per (slice, item), slice by slice: blocks dispatch roughly
// in index order, so every item's shrink runs first on the whole GPU and the expand blocks, which
// wait, come after (measured: interleaving each item's expand blocks with its shrink blocks held SM
// slots with waiting blocks and was up to 1.3x slower at 32 adapters). False past the shape's blocks.
__device__ __forceinline__ bool fused_block_item(const FusedArgs& p, const FusedShape& f, int b, int& s, int& item) {
    const int per_slice = f.items * f.ksplit;
    if (b < p.slices.count * per_slice) {
        s = b / per_slice;
        item = (b - s * per_slice) / f.ksplit;
        return true;
    }
    b -= p.slices.count * per_slice;
    for (s = 0; s < p.slices.count; ++s) {
        const int groups = fused_groups(p, f, s);
        if (b < f.items * groups) {
            item = b / groups;
            return true;
        }
        b -= f.items * groups;
    }
    return false;
}

template <bool BF16, bool STAGED_A>
__device__ void fused_decode(const FusedArgs& p) {
    extern __shared__ __align__(16) unsigned char fsm[];
    __shared__ int role;
    // The grid is laid out for max_items items (the host's plan, or, sized on the device, the most
    // items the step can have); the role itself comes from the group's ticket, whatever the
    // dispatch order.
    int s, item;
    FusedShape f = fused_placed_shape(p);
    if (!fused_block_item(p, f, blockIdx.x, s, item)) {
        if (p.split_target <= 0) return;  // past the last slice: cannot happen for the launcher's grid
        item = p.max_items;               // read the count below, then place the block
    }
    // Launched as a programmatic dependent (sm_90, LORAMUX_FUSED_PDL): the launch and dispatch
    // overlap the kernel before it; nothing is read before it has finished (the segments may be
    // its output, the workspace its counters). Without the attribute both are no-ops.
    pdl_wait();
    pdl_launch_dependents();  // a dependent launched after this one waits on it the same way
    WorkItem w = work_item(p.segments, p.max_items, p.T, item);
    if (p.split_target > 0) {
        // the step's item count came with the item (same trip): where it is not the count the
        // block was placed for, place it again (one more trip); blocks past the shape leave
        const int n = min(max(p.segments[0], 0), p.max_items);
        if (n != f.items) {
            f = fused_shape(p, n);
            if (n == 0 || !fused_block_item(p, f, blockIdx.x, s, item)) return;
            w = work_item(p.segments, p.max_items, p.T, item);
        }
    }
    if (w.count == 0) return;  // no such item in this step: the whole group leaves, touching nothing
    const int group = f.ksplit + fused_groups(p, f, s);
    int* ws = fused_workspace(p.segments, p.max_items, p.T, p.table.num_slots) +
              LMX_FUSED_WS_WORDS * (s * p.max_items + item);
    // ws[0]: the group's next ticket, ws[1]: its completion count. Both wrap to 0 at the group's
    // size (atomicInc), so the group leaves them zeroed with no reset pass: every block of it bumps
    // each once (the expand blocks only once they have seen the shrink's count complete).
    const unsigned wrap = (unsigned)group - 1;
    if (threadIdx.x == 0) role = (int)atomicInc(reinterpret_cast<unsigned*>(&ws[0]), wrap);
    stage_item_tokens(w, reinterpret_cast<int*>(fsm));  // both roles' token list, same trip
    const AdapterEntry e = read_entry(p.table, w.slot, p.slices.module_id[s]);  // same trip
    __syncthreads();
    unsigned* done = reinterpret_cast<unsigned*>(&ws[1]);
    if (role < f.ksplit) {
        fused_shrink<BF16, STAGED_A>(p, w, e, done, wrap, s, role, f.kchunk, fsm);
    } else {
        const int g = role - f.ksplit, nt = min(DECODE_TOKENS, w.count);
        if (nt <= 1)
            fused_expand<BF16, 1>(p, w, e, done, wrap, s, g, f.ksplit, f.col_steps, fsm);
        else if (nt <= 2)
            fused_expand<BF16, 2>(p, w, e, done, wrap, s, g, f.ksplit, f.col_steps, fsm);
        else
            fused_expand<BF16, DECODE_TOKENS>(p, w, e, done, wrap, s, g, f.ksplit, f.col_steps, fsm);
    }
}

// Instantiations: A in registers (the shrink_decode_item form) at 3, 4 (`_m4`: 64 registers) and 5
// (`_m5`) blocks an SM; A staged in shared memory (`_sa<m>`) at 3, 4 and 5 blocks an SM. rust/src/cuda/
// plan/fused.rs fused_kind_blocks_per_sm and fused_stages_a pick one; never more blocks than shared memory lets reside.
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_fused_decode_bf16(const FusedArgs p) { fused_decode<true, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_fused_decode_f16(const FusedArgs p) { fused_decode<false, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 4) lora_fused_decode_bf16_m4(const FusedArgs p) { fused_decode<true, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 4) lora_fused_decode_f16_m4(const FusedArgs p) { fused_decode<false, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 5) lora_fused_decode_bf16_m5(const FusedArgs p) { fused_decode<true, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 5) lora_fused_decode_f16_m5(const FusedArgs p) { fused_decode<false, false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_fused_decode_bf16_sa3(const FusedArgs p) { fused_decode<true, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_fused_decode_f16_sa3(const FusedArgs p) { fused_decode<false, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 4) lora_fused_decode_bf16_sa4(const FusedArgs p) { fused_decode<true, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 4) lora_fused_decode_f16_sa4(const FusedArgs p) { fused_decode<false, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 5) lora_fused_decode_bf16_sa5(const FusedArgs p) { fused_decode<true, true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 5) lora_fused_decode_f16_sa5(const FusedArgs p) { fused_decode<false, true>(p); }
