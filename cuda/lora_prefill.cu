// Prefill (batches past the small-item bound, plan.rs) on tensor cores as pipelined streams:
// the shrink streams x and A through a ring of cp.async k-steps, the expand streams y and B
// through a ring of 64-column tiles, so each block keeps several loads in flight instead of one
// dependent trip per step (ncu: the register-staged shrink_tile / expand_tile ran at 10-18 % of
// DRAM bandwidth). Same work items, partial layout and sums as lora_shrink.cu / lora_expand.cu.
// Both take 16-byte copies only: the launcher sends unaligned x / y and Hi or Ho not a multiple
// of 8 to the register-staged kernels. lora_common.cuh is prepended by the loader.

#define PF_KSTEP 64
#define PF_SHRINK_STAGES 4   // k-steps of x and A in the ring (3 in flight while one is multiplied)
// column tiles of y and B in the expand's ring (its template parameter: 4 and 5 were measured on
// the H200 at ranks <= 16 / 48, still 3 blocks an SM, and were no faster: docs/kernel-notes.md)
#define PF_EXPAND_STAGES 3
#define PF_PITCH 72          // halves a row of an x / A / y tile: 144 bytes, conflict-free fragments
#define PF_OTILE 64
#define EXPAND_PIPE_KSTEPS 8    // k16 steps of the largest rank (128) an expand holds u for

__device__ __forceinline__ u32 pf_smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes global -> shared (L2 only); zeros when !valid (nothing read: src is any mapped address)
__device__ __forceinline__ void pf_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(pf_smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void pf_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void pf_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Rows of the A tile a stage holds: the launch's max rank, padded to the mma's n16.
__device__ __forceinline__ int pf_rank_rows(int max_rank) { return (max_rank + 15) & ~15; }

// Work item i as a pipelined block takes it. merge > 1 (small items, 8 tokens each): a slot's
// consecutive small items are merged into the 64-token tile the block holds anyway, so one
// adapter's 256 tokens are 4 blocks reading A and B once each, not 32 (a slot's items are
// consecutive and its tokens contiguous in the list, every item but its last full). Item i leads
// when i % merge == 0 or item i-1 is another slot's, and takes its slot's items up to the next
// multiple of merge; a follower gets count -1 (nothing to do). merge 1: work_item as it is.
__device__ __forceinline__ WorkItem pf_item(const int* seg, int max_items, int T, int i, int merge) {
    WorkItem w = work_item(seg, max_items, T, i);
    if (merge <= 1 || w.count <= 0) return w;
    const int* item_slot = seg + LMX_SEG_HEADER;
    const int* item_count = item_slot + 2 * max_items;
    if (i % merge != 0 && item_slot[i - 1] == w.slot) {
        w.count = -1;
        return w;
    }
    const int end = min(w.items, (i / merge + 1) * merge);
    int count = w.count;
    for (int j = i + 1; j < end && item_slot[j] == w.slot; ++j) count += max(item_count[j], 0);
    const int begin = (int)(w.tokens - (seg + LMX_SEG_HEADER + 3 * max_items));
    w.count = min(min(count, LMX_TILE_T), T - begin);  // clamped as work_item does
    return w;
}

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
// and every other 8-wide rank tile from (w>>2). Dynamic shared memory: PF_SHRINK_STAGES x
// (64 + rank rows) x PF_PITCH halves. USUM 1: u element by element (the prefill-5 form, kept
// for A/B runs: `_serial`), else usum_groups where ranks come in fours and the item holds more than
// PF_USUM_SERIAL_MAX u elements (USUM 0) or wherever ranks come in fours (USUM 2: prefill-6's rule,
// `_f4`, for A/B runs). Every form adds the same partials in the same order: bit for bit equal.
#define PF_USUM_RULE 0
#define PF_USUM_SERIAL 1
#define PF_USUM_FLOAT4 2
template <bool BF16, int USUM>
__device__ void shrink_pipe(const ShrinkArgs& p) {
    extern __shared__ __align__(16) unsigned char pf_dyn[];
    __shared__ int tokens[LMX_TILE_T];
    __shared__ int is_last;
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
    const int stage_halves = (LMX_TILE_T + pf_rank_rows(p.table.max_rank)) * PF_PITCH;
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
        const int ntile8 = (R + 7) >> 3;
        const int nrows_a = ntile8 * 8;
        const bool avec = (reinterpret_cast<u64>(e.a) & 15) == 0;
        // k-step j of x (the item's tokens) and A (its rank rows) into ring stage j % STAGES; one
        // commit group a call, empty past the last step, so the waits below count uniformly.
        auto issue = [&](int j) {
            if (j < nsteps) {
                u16* xs = ring + (j % PF_SHRINK_STAGES) * stage_halves;
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
        for (int j = 0; j < PF_SHRINK_STAGES - 1; ++j) issue(j);
        float acc[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
        for (int j = 0; j < nsteps; ++j) {
            pf_wait<PF_SHRINK_STAGES - 2>();  // step j is in (this thread's copies)
            __syncthreads();                   // everyone's copies; step j-1's stage is free
            issue(j + PF_SHRINK_STAGES - 1);
            const u16* xs = ring + (j % PF_SHRINK_STAGES) * stage_halves;
            const u16* as = xs + LMX_TILE_T * PF_PITCH;
            if (mt * 16 < nt) {
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
        for (int i = 0; i < 8; ++i) {
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
        // same u whichever block is last)
        __threadfence();
        __syncthreads();
        if (tid == 0) {
            int* count = done + LMX_FUSED_WS_WORDS * (s * p.max_items + it);
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
template <bool BF16, int STAGES>
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
    const int bpitch = pf_rank_rows(p.table.max_rank) + 8;  // halves: conflict-free for every rank
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
        const int rk = (R + 15) & ~15;  // K padded to the mma's 16 with zeros
        const int bchunks = rk / 8;
        const bool bvec = (R % 8 == 0) && ((reinterpret_cast<u64>(e.b) & 15) == 0);
        // tile j into ring stage `stage` (= j % STAGES, kept by the caller: no division in the loop)
        auto issue = [&](int j, int stage) {
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
        if (!waited) {
            pdl_wait();
            waited = true;
        }
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
        u32 af[EXPAND_PIPE_KSTEPS][4];
        {
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
                // y + delta (DoRA: scaled) back into the y tile; Ho is a multiple of 8 here, so a
                // column pair is in the slice or out of it together
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int row = mt * 16 + gq + hh * 8;
                        const int col = nh * 32 + i * 8 + tq * 2;
                        if (row < nt && o0 + col < ho) {
                            u32* yp = reinterpret_cast<u32*>(ys + row * PF_PITCH + col);
                            const u32 yv = *yp;
                            float v0 = to_f32<BF16>((u16)(yv & 0xffff)) + acc[i][2 * hh];
                            float v1 = to_f32<BF16>((u16)(yv >> 16)) + acc[i][2 * hh + 1];
                            if (e.scale) {
                                v0 *= to_f32<BF16>(e.scale[o0 + col]);
                                v1 *= to_f32<BF16>(e.scale[o0 + col + 1]);
                            }
                            *yp = pack2(from_f32<BF16>(v0), from_f32<BF16>(v1));
                        }
                    }
                }
            }
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
}

extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_RULE>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_RULE>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_serial(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_SERIAL>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_serial(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_SERIAL>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_bf16_f4(const ShrinkArgs p) { shrink_pipe<true, PF_USUM_FLOAT4>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_shrink_f16_f4(const ShrinkArgs p) { shrink_pipe<false, PF_USUM_FLOAT4>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_bf16(const ExpandArgs p) { expand_pipe<true, PF_EXPAND_STAGES>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_prefill_expand_f16(const ExpandArgs p) { expand_pipe<false, PF_EXPAND_STAGES>(p); }
