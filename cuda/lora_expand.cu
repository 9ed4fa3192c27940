// LoRA expand, in place: y[t, off_s + o] += sum_r u[s, t, r] * B_{slot(t)}[o, r], where
// u = sum over the ksplit shrink partials; DoRA rows then scale: y = scale[o] * (y + delta).
// A block takes one work item of the step's token segments (tokens of one adapter slot,
// lora_common.cuh), so it reads its B rows once for all of them whatever the token order;
// no-adapter tokens and rank-0 entries are never touched.
// lora_common.cuh is prepended by the loader.

#define EXPAND_MAX_RANK 128

// Partials a decode expand sums: the shrink's device split of the step's `items` (decode_split),
// or all ksplit of them. The partials keep their stride of ksplit splits either way.
__device__ __forceinline__ int summed_splits(const ExpandArgs& p, int items) {
    if (p.split_target <= 0) return p.ksplit;
    const int ks = decode_split(items, p.slices.count, p.hi, p.split_target).ksplit;
    return ks <= p.ksplit ? ks : p.ksplit;  // as the shrink: its planned split where the count's would not fit
}

// Sums the ksplit partials of the item's tokens into su[i * pitch + r] (fp32), zero past R.
__device__ __forceinline__ void load_u(float* su, int pitch, int rcols, const ExpandArgs& p,
                                       const int* tokens, int nt, int s, int R, int splits) {
    for (int idx = threadIdx.x; idx < nt * rcols; idx += blockDim.x) {
        const int i = idx / rcols, r = idx % rcols;
        float v = 0.f;
        if (r < R) {
            const long long t = tokens[i];
#pragma unroll 16
            for (int c = 0; c < splits; ++c)
                v += p.partial[(((long long)s * p.ksplit + c) * p.T + t) * p.table.max_rank + r];
        }
        su[i * pitch + r] = v;
    }
}

__device__ __forceinline__ bool slice_of(const ExpandArgs& p, int s, int& module_id, int& off, int& ho) {
    if (s >= p.slices.count) return false;
    module_id = p.slices.module_id[s];
    off = p.slices.out_offset[s];
    ho = p.slices.out_size[s];
    return true;
}



// Small items (T <= 512, plan.rs): work items of <= 8 tokens of one adapter along blockIdx.y, OPT
// output columns per thread (o0 + tid + 256 j), CUDA cores. Before waiting on the shrink (PDL) each thread already
// holds its B rows (the first 64/OPT ranks, 16-byte loads) and the y values of every token of the
// item, so the expand's own memory latency hides under the shrink.
#define EXPAND_ITEM 8

template <bool BF16, int OPT, int QP>  // QP: 8-rank chunks of B prefetched per column
__device__ void expand_decode(const ExpandArgs& p) {
    __shared__ int tokens[EXPAND_ITEM];
    __shared__ float su[EXPAND_ITEM * EXPAND_MAX_RANK];
    int module_id, off, ho;
    if (!slice_of(p, blockIdx.z, module_id, off, ho)) return;
    const int o0 = blockIdx.x * p.ochunk;
    if (o0 >= ho) return;
    const int o_end = min(ho, o0 + p.ochunk);
    bool waited = false;
    for (int it = blockIdx.y;; it += gridDim.y) {
        const WorkItem w = work_item(p.segments, p.max_items, p.T, it);
        if (w.count == 0) break;
        const AdapterEntry e = read_entry(p.table, w.slot, module_id);
        const int R = e.rank;
        if (R == 0) continue;  // uniform over the block
        const int nt = min(EXPAND_ITEM, w.count);
        if (threadIdx.x < nt) tokens[threadIdx.x] = w.tokens[threadIdx.x];
        __syncthreads();
        const bool vec = (R % 8 == 0) && ((reinterpret_cast<u64>(e.b) & 15) == 0);
        uint4 bq[OPT][QP];
        u16 yv[OPT][EXPAND_ITEM];
#pragma unroll
        for (int j = 0; j < OPT; ++j) {
            const int o = o0 + threadIdx.x + j * LMX_THREADS;
            if (o < o_end) {
                const u16* brow = e.b + (long long)o * R;
#pragma unroll
                for (int q = 0; q < QP; ++q)
                    if (vec && q * 8 < R) bq[j][q] = *reinterpret_cast<const uint4*>(brow + q * 8);
#pragma unroll
                for (int t = 0; t < EXPAND_ITEM; ++t)
                    if (t < nt) yv[j][t] = p.y[(long long)tokens[t] * p.y_stride + off + o];
            }
        }
        if (!waited) {
            pdl_wait();
            waited = true;
        }
        const int rcols = (R + 7) & ~7;
        load_u(su, rcols, rcols, p, tokens, nt, blockIdx.z, R, summed_splits(p, w.items));
        __syncthreads();
#pragma unroll
        for (int j = 0; j < OPT; ++j) {
            const int o = o0 + threadIdx.x + j * LMX_THREADS;
            if (o >= o_end) continue;
            const u16* brow = e.b + (long long)o * R;
            const float sc = e.scale ? to_f32<BF16>(e.scale[o]) : 1.f;
            float acc[EXPAND_ITEM];
#pragma unroll
            for (int t = 0; t < EXPAND_ITEM; ++t) acc[t] = 0.f;
#pragma unroll
            for (int q = 0; q < EXPAND_MAX_RANK / 8; ++q) {
                if (q * 8 < R) {
                    u16 bv[8];
                    if (q < QP && vec) unpack8(bq[j][q < QP ? q : 0], bv);
                    else load8(brow, q * 8, R, vec, bv);
                    float bf[8];
#pragma unroll
                    for (int k = 0; k < 8; ++k) bf[k] = to_f32<BF16>(bv[k]);
#pragma unroll
                    for (int t = 0; t < EXPAND_ITEM; ++t) {
                        if (t < nt) {
                            const float* ur = su + t * rcols + q * 8;
#pragma unroll
                            for (int k = 0; k < 8; ++k) acc[t] += ur[k] * bf[k];
                        }
                    }
                }
            }
#pragma unroll
            for (int t = 0; t < EXPAND_ITEM; ++t) {
                if (t < nt) {
                    float v = to_f32<BF16>(yv[j][t]) + acc[t];
                    if (e.scale) v *= sc;
                    p.y[(long long)tokens[t] * p.y_stride + off + o] = from_f32<BF16>(v);
                }
            }
        }
        __syncthreads();  // tokens and su are rewritten by the next item
    }
}

// Decode (T <= 64), flat: no grouping. Block = (p.ochunk columns, slice); thread = one column
// o0 + tid % ochunk of the token rows tid / ochunk, += 256 / ochunk (the planner keeps that <= 4
// rows a thread). Slot-table entries are read once per block into shared memory; then, before
// waiting on the shrink (PDL), each thread issues the B-row loads (first 16 ranks) and y loads of
// all its rows at once: the only dependent chain is slot -> entry -> B, and it overlaps the shrink.
// Tokens sharing an adapter re-read its B rows from L1/L2 (decode tiles are <= 64 tokens).
// Taken for multi-slice launches of 32..64 tokens (plan/expand.rs decode_expand_is_flat: measured there).
#define FLAT_ROWS 4   // token rows per thread (prefetched in registers)
#define FLAT_PQ 2     // 8-rank chunks of B prefetched per row

template <bool BF16>
__device__ void expand_flat(const ExpandArgs& p) {
    __shared__ const u16* sb[LMX_TILE_T];
    __shared__ const u16* ssc[LMX_TILE_T];
    __shared__ int srank[LMX_TILE_T];
    __shared__ float su[LMX_TILE_T * EXPAND_MAX_RANK];
    int module_id, off, ho;
    if (!slice_of(p, blockIdx.z, module_id, off, ho)) return;
    const int oc = p.ochunk;
    const int o0 = blockIdx.x * oc;
    if (o0 >= ho) return;
    const int tid = threadIdx.x;
    if (tid < p.T) {
        const int slot = p.slot_of_token[tid];
        int rank = 0;
        const u16* b = nullptr;
        const u16* sc = nullptr;
        if (slot >= 0 && slot < p.table.num_slots) {
            const AdapterEntry e = read_entry(p.table, slot, module_id);
            rank = e.rank;
            b = e.b;
            sc = e.scale;
        }
        srank[tid] = rank;
        sb[tid] = b;
        ssc[tid] = sc;
    }
    __syncthreads();
    const int col = tid % oc, row0 = tid / oc, rstep = LMX_THREADS / oc;
    const int o = o0 + col;
    const bool live = o < ho;
    uint4 bq[FLAT_ROWS][FLAT_PQ];
    u16 yv[FLAT_ROWS];
#pragma unroll
    for (int i = 0; i < FLAT_ROWS; ++i) {
        const int t = row0 + i * rstep;
        const int R = t < p.T ? srank[t] : 0;
        if (live && R > 0) {
            const u16* brow = sb[t] + (long long)o * R;
            const bool vec = (R % 8 == 0) && ((reinterpret_cast<u64>(sb[t]) & 15) == 0);
#pragma unroll
            for (int q = 0; q < FLAT_PQ; ++q)
                if (vec && q * 8 < R) bq[i][q] = *reinterpret_cast<const uint4*>(brow + q * 8);
            yv[i] = p.y[(long long)t * p.y_stride + off + o];
        }
    }
    // the step's item count (the segments were built before the shrink this waits on)
    const int splits = p.split_target > 0 ? summed_splits(p, min(max(p.segments[0], 0), p.max_items)) : p.ksplit;
    pdl_wait();
    const int mr = p.table.max_rank;
    for (int idx = tid; idx < p.T * mr; idx += LMX_THREADS) {
        const int t = idx / mr, r = idx % mr;
        float v = 0.f;
        if (r < srank[t]) {
#pragma unroll 16
            for (int c = 0; c < splits; ++c)
                v += p.partial[(((long long)blockIdx.z * p.ksplit + c) * p.T + t) * mr + r];
        }
        su[idx] = v;
    }
    __syncthreads();
    if (!live) return;
    float acc[FLAT_ROWS];
#pragma unroll
    for (int i = 0; i < FLAT_ROWS; ++i) {
        acc[i] = 0.f;
        const int t = row0 + i * rstep;
        const int R = t < p.T ? srank[t] : 0;
        if (R == 0) continue;
        const u16* brow = sb[t] + (long long)o * R;
        const bool vec = (R % 8 == 0) && ((reinterpret_cast<u64>(sb[t]) & 15) == 0);
        const float* ur = su + t * mr;
#pragma unroll
        for (int q = 0; q < EXPAND_MAX_RANK / 8; ++q) {
            if (q * 8 < R) {  // unrolled with a guard so bq stays in registers
                u16 bv[8];
                if (q < FLAT_PQ && vec) unpack8(bq[i][q < FLAT_PQ ? q : 0], bv);
                else load8(brow, q * 8, R, vec, bv);
#pragma unroll
                for (int k = 0; k < 8; ++k)
                    if (q * 8 + k < R) acc[i] += ur[q * 8 + k] * to_f32<BF16>(bv[k]);
            }
        }
    }
    // every y load was issued before the wait; now only stores
#pragma unroll
    for (int i = 0; i < FLAT_ROWS; ++i) {
        const int t = row0 + i * rstep;
        const int R = t < p.T ? srank[t] : 0;
        if (R == 0) continue;
        float v = to_f32<BF16>(yv[i]) + acc[i];
        if (ssc[t]) v *= to_f32<BF16>(ssc[t][o]);
        p.y[(long long)t * p.y_stride + off + o] = from_f32<BF16>(v);
    }
}

#define EXPAND_OTILE 64
#define EXPAND_PITCH (EXPAND_MAX_RANK + 8)  // halves: 272 bytes a row, conflict-free fragments

// Prefill (T > 256): tensor cores, M = the item's tokens, N = CT tiles of 64 output columns, K =
// rank. Warp w owns token rows 16*(w&3).. and output columns 32*(w>>2)..+32 (four n8 tiles) of
// each tile. The u fragments stay in registers across the CT tiles, and the next tile's B rows are
// loaded while the current one is multiplied and written, so the item lookup, the u load and the
// wait on the shrink are paid once per CT tiles.
template <bool BF16, int CT>
__device__ void expand_tile(const ExpandArgs& p) {
    __shared__ int tokens[LMX_TILE_T];
    // us (u as the mma's A operand) until its fragments are in registers; then ct, the fp32 output
    // tile the epilogue reads back row by row for 16-byte coalesced y updates; bs: B rows.
    __shared__ __align__(16) u16 smem[(LMX_TILE_T + EXPAND_OTILE) * EXPAND_PITCH];
    u16 (*us)[EXPAND_PITCH] = reinterpret_cast<u16 (*)[EXPAND_PITCH]>(smem);
    u16 (*bs)[EXPAND_PITCH] = reinterpret_cast<u16 (*)[EXPAND_PITCH]>(smem + LMX_TILE_T * EXPAND_PITCH);
    float (*ct)[EXPAND_OTILE + 4] = reinterpret_cast<float (*)[EXPAND_OTILE + 4]>(smem);
    int module_id, off, ho;
    if (!slice_of(p, blockIdx.z, module_id, off, ho)) return;
    const int ob = blockIdx.x * (EXPAND_OTILE * CT);
    if (ob >= ho) return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, tq = lane & 3;
    const int mt = warp & 3, nh = warp >> 2;
    const bool yvec_base = (p.y_stride % 8 == 0) && ((reinterpret_cast<u64>(p.y) & 15) == 0);
    for (int it = blockIdx.y;; it += gridDim.y) {
        const WorkItem w = work_item(p.segments, p.max_items, p.T, it);
        if (w.count == 0) break;
        const AdapterEntry e = read_entry(p.table, w.slot, module_id);
        const int R = e.rank;
        if (R == 0) continue;  // uniform over the block
        const int nt = min(LMX_TILE_T, w.count);
        if (tid < nt) tokens[tid] = w.tokens[tid];
        const int rk = (R + 15) & ~15;  // K padded to the mma's 16 with zeros
        const int bchunks = rk / 8;     // 16-byte chunks of a B row in bs
        const bool vec = (R % 8 == 0) && ((reinterpret_cast<u64>(e.b) & 15) == 0);
        uint4 bv[4];  // this thread's share of one B tile (64 rows x rk), staged in registers
        auto fetch_b = [&](int o0) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int idx = tid + q * LMX_THREADS;
                const int o = idx / bchunks, r = (idx % bchunks) * 8;
                u16 v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                if (idx < EXPAND_OTILE * bchunks && o0 + o < ho) load8(e.b + (long long)(o0 + o) * R, r, R, vec, v);
                bv[q] = pack8(v);
            }
        };
        // HOLD (CT > 1): u's fragments move to registers once for all tiles, freeing us for ct, and
        // B tiles are staged through registers (the first before the wait, each next one during the
        // current tile). CT == 1 keeps the leaner form (u read from us in the mma, B loaded straight
        // to bs): 40 fewer registers, 6 blocks an SM instead of 4 (measured 15-35 % faster at
        // T = 2048 on the H200 than staging through registers at CT == 1).
        constexpr bool HOLD = CT > 1;
        if constexpr (HOLD) fetch_b(ob);  // B does not depend on the shrink: in flight before the wait
        __syncthreads();
        pdl_wait();
        // u (fp32 partial sums) -> 16-bit operand tile
        for (int idx = tid; idx < LMX_TILE_T * rk; idx += LMX_THREADS) {
            const int i = idx / rk, r = idx % rk;
            float v = 0.f;
            if (i < nt && r < R) {
                const long long t = tokens[i];
#pragma unroll 16
                for (int c = 0; c < p.ksplit; ++c)
                    v += p.partial[(((long long)blockIdx.z * p.ksplit + c) * p.T + t) * p.table.max_rank + r];
            }
            us[i][r] = from_f32<BF16>(v);
        }
        if constexpr (!HOLD) {
            for (int idx = tid; idx < EXPAND_OTILE * bchunks; idx += LMX_THREADS) {
                const int o = idx / bchunks, r = (idx % bchunks) * 8;
                u16 v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                if (ob + o < ho) load8(e.b + (long long)(ob + o) * R, r, R, vec, v);
                *reinterpret_cast<uint4*>(&bs[o][r]) = pack8(v);
            }
        }
        __syncthreads();
        auto load_af = [&](int kk, u32 a4[4]) {
            const int r0 = mt * 16 + gq;
            a4[0] = *reinterpret_cast<const u32*>(&us[r0][kk + tq * 2]);
            a4[1] = *reinterpret_cast<const u32*>(&us[r0 + 8][kk + tq * 2]);
            a4[2] = *reinterpret_cast<const u32*>(&us[r0][kk + tq * 2 + 8]);
            a4[3] = *reinterpret_cast<const u32*>(&us[r0 + 8][kk + tq * 2 + 8]);
        };
        u32 af[HOLD ? EXPAND_MAX_RANK / 16 : 1][4];
        if constexpr (HOLD) {
#pragma unroll
            for (int k = 0; k < EXPAND_MAX_RANK / 16; ++k)
                if (k * 16 < rk && mt * 16 < nt) load_af(k * 16, af[k]);
            __syncthreads();  // us is in registers; ct overlays it from here
        }
        for (int c = 0; c < CT; ++c) {
            const int o0 = ob + c * EXPAND_OTILE;
            if (o0 >= ho) break;  // uniform over the block
            if constexpr (HOLD) {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int idx = tid + q * LMX_THREADS;
                    if (idx < EXPAND_OTILE * bchunks)
                        *reinterpret_cast<uint4*>(&bs[idx / bchunks][(idx % bchunks) * 8]) = bv[q];
                }
                __syncthreads();
                if (c + 1 < CT && o0 + EXPAND_OTILE < ho) fetch_b(o0 + EXPAND_OTILE);  // next tile, in flight
            }
            float acc[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
            if (mt * 16 < nt) {
#pragma unroll
                for (int k = 0; k < EXPAND_MAX_RANK / 16; ++k) {
                    if (k * 16 < rk) {
                        const int kk = k * 16;
                        u32 a4[4];
                        if constexpr (HOLD) {
                            a4[0] = af[k][0]; a4[1] = af[k][1]; a4[2] = af[k][2]; a4[3] = af[k][3];
                        } else {
                            load_af(kk, a4);
                        }
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const int obr = nh * 32 + i * 8 + gq;
                            u32 bf[2];
                            bf[0] = *reinterpret_cast<const u32*>(&bs[obr][kk + tq * 2]);
                            bf[1] = *reinterpret_cast<const u32*>(&bs[obr][kk + tq * 2 + 8]);
                            mma16816<BF16>(acc[i], a4, bf);
                        }
                    }
                }
            }
            if constexpr (!HOLD) __syncthreads();  // us is read; ct overlays it
            if (mt * 16 < nt) {
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int h = 0; h < 4; ++h)
                        ct[mt * 16 + gq + ((h & 2) ? 8 : 0)][nh * 32 + i * 8 + tq * 2 + (h & 1)] = acc[i][h];
            }
            __syncthreads();
            // y += ct (DoRA: y = scale * (y + ct)), 8 threads a token row, 8 columns (16 bytes) each
            const bool yvec = yvec_base && ((off + o0) % 8 == 0);
            for (int idx = tid; idx < nt * (EXPAND_OTILE / 8); idx += LMX_THREADS) {
                const int i = idx / (EXPAND_OTILE / 8), cc = (idx % (EXPAND_OTILE / 8)) * 8;
                const int o = o0 + cc;
                if (o >= ho) continue;
                u16* yp = p.y + (long long)tokens[i] * p.y_stride + off + o;
                if (yvec && o + 8 <= ho) {
                    u16 yv[8], sv[8];
                    unpack8(*reinterpret_cast<const uint4*>(yp), yv);
                    if (e.scale) unpack8(*reinterpret_cast<const uint4*>(e.scale + o), sv);
                    u16 out[8];
#pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        float v = to_f32<BF16>(yv[k]) + ct[i][cc + k];
                        if (e.scale) v *= to_f32<BF16>(sv[k]);
                        out[k] = from_f32<BF16>(v);
                    }
                    *reinterpret_cast<uint4*>(yp) = pack8(out);
                } else {
                    for (int k = 0; k < 8 && o + k < ho; ++k) {
                        float v = to_f32<BF16>(yp[k]) + ct[i][cc + k];
                        if (e.scale) v *= to_f32<BF16>(e.scale[o + k]);
                        yp[k] = from_f32<BF16>(v);
                    }
                }
            }
            __syncthreads();  // ct and bs are rewritten by the next tile / item
        }
    }
}

// o1: 16 ranks of B prefetched, 3 blocks an SM (the latency-bound decode expand wants more blocks
// resident); o1w: 64 ranks prefetched, 2 blocks an SM (as landed before); o4: 4 columns a thread.
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_expand_decode_bf16_o1(const ExpandArgs p) { expand_decode<true, 1, 2>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_expand_decode_f16_o1(const ExpandArgs p) { expand_decode<false, 1, 2>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 2) lora_expand_decode_bf16_o1w(const ExpandArgs p) { expand_decode<true, 1, 8>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 2) lora_expand_decode_f16_o1w(const ExpandArgs p) { expand_decode<false, 1, 8>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 2) lora_expand_decode_bf16_o4(const ExpandArgs p) { expand_decode<true, 4, 2>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 2) lora_expand_decode_f16_o4(const ExpandArgs p) { expand_decode<false, 4, 2>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_expand_flat_bf16(const ExpandArgs p) { expand_flat<true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_expand_flat_f16(const ExpandArgs p) { expand_flat<false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS) lora_expand_tile_bf16_c1(const ExpandArgs p) { expand_tile<true, 1>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS) lora_expand_tile_f16_c1(const ExpandArgs p) { expand_tile<false, 1>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS) lora_expand_tile_bf16_c4(const ExpandArgs p) { expand_tile<true, 4>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS) lora_expand_tile_f16_c4(const ExpandArgs p) { expand_tile<false, 4>(p); }
