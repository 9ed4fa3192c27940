// LoRA shrink: partial[s, c, t, r] = sum_{i in split c} x[t, i] * A_{slot(t)}[r, i]  (fp32).
// A block takes one work item of the step's token segments (<= 64 tokens of one adapter slot,
// lora_common.cuh), so it reads the adapter's A chunk once for all of them whatever the token
// order; the reduction dim is split over blockIdx.x (ksplit) so decode batches spread over every
// SM. The expand kernel sums the ksplit partials when it loads u.
// lora_common.cuh and lora_shrink_decode.cuh are prepended by the loader.

// Decode (T <= 64): one item and one split a block at a time (shrink_decode_item,
// lora_shrink_decode.cuh, prepended by the loader).
template <bool BF16>
__device__ void shrink_decode(const ShrinkArgs& p) {
    __shared__ int tokens[DECODE_TOKENS];
    __shared__ __align__(16) u16 xs[DECODE_TOKENS * DECODE_MAX_CHUNK];
    int s = blockIdx.z, c = blockIdx.x, it0 = blockIdx.y;
    if (p.split_target > 0) {
        // split from the step's item count: the grid is laid out split-major (blocks dispatch in
        // index order), so the splits the count takes come first and the spare ones, last, leave
        const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        const int per_split = gridDim.y * gridDim.z;
        c = lin / per_split;
        s = (lin - c * per_split) / gridDim.y;
        it0 = lin - c * per_split - s * gridDim.y;
    }
    pdl_launch_dependents();
    if (s >= p.slices.count) return;
    const int module_id = p.slices.module_id[s];
    int kchunk = p.kchunk;
    float* out = p.partial + ((long long)(s * p.ksplit + c) * p.T) * p.table.max_rank;
    for (int it = it0;; it += gridDim.y) {
        const WorkItem w = work_item(p.segments, p.max_items, p.T, it);
        if (w.count == 0) break;
        if (p.split_target > 0) {  // same trip as the item: no extra wait
            const DecodeSplit d = decode_split(w.items, p.slices.count, p.hi, p.split_target);
            if (d.ksplit <= p.ksplit) {  // the host sized the grid and partials for every count
                if (c >= d.ksplit) break;
                kchunk = d.kchunk;
            }
        }
        const int k_begin = c * kchunk;
        const int k_end = min(p.hi, k_begin + kchunk);
        stage_item_tokens(w, tokens);  // same trip as the entry (the last item's barrier freed them)
        const AdapterEntry e = read_entry(p.table, w.slot, module_id);
        __syncthreads();
        if (e.rank == 0) continue;  // uniform over the block
        shrink_decode_item<BF16>(p.x, p.x_stride, p.hi, p.table.max_rank, w, e, k_begin, k_end, out, tokens, xs);
    }
}

#define SHRINK_KSTEP 64
#define SHRINK_PITCH 72  // halves per smem row: 144 bytes, conflict-free fragment loads


// Prefill (T > 64): tensor cores. Block = (split c, work item, slice s); 8 warps:
// warp w owns token rows 16*(w&3).. and every other 8-wide rank tile starting at (w>>2).
template <bool BF16>
__device__ void shrink_tile(const ShrinkArgs& p) {
    __shared__ int tokens[LMX_TILE_T];
    __shared__ __align__(16) u16 xs[LMX_TILE_T][SHRINK_PITCH];
    __shared__ __align__(16) u16 as[128][SHRINK_PITCH];
    const int s = blockIdx.z;
    const int c = blockIdx.x;
    if (s >= p.slices.count) return;
    pdl_launch_dependents();
    const int module_id = p.slices.module_id[s];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gq = lane >> 2, tq = lane & 3;
    const int k_begin = c * p.kchunk;
    const int k_end = min(p.hi, k_begin + p.kchunk);
    const bool vec = (p.hi % 8 == 0) && (p.x_stride % 8 == 0) &&
                     ((reinterpret_cast<u64>(p.x) & 15) == 0);
    for (int it = blockIdx.y;; it += gridDim.y) {
        const WorkItem w = work_item(p.segments, p.max_items, p.T, it);
        if (w.count == 0) break;
        const AdapterEntry e = read_entry(p.table, w.slot, module_id);
        if (e.rank == 0) continue;  // uniform over the block
        const int nt = min(LMX_TILE_T, w.count);
        if (tid < nt) tokens[tid] = w.tokens[tid];
        __syncthreads();
        const int R = e.rank;
        const int ntile8 = (R + 7) >> 3;
        const int nrows_a = ntile8 * 8;
        const int mt = warp & 3, nbase = warp >> 2;
        float acc[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
        // Register staging of the next k-step: x (2 chunks of 8) and A (up to 4 chunks of 8).
        uint4 xv[2], av[4];
        auto fetch = [&](int k0) {
            u16 tmp[8];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int idx = tid + q * LMX_THREADS;
                const int xr = idx >> 3, xc = (idx & 7) * 8;
                if (xr < nt) {
                    load8(p.x + (long long)tokens[xr] * p.x_stride, k0 + xc, k_end, vec, tmp);
                    xv[q] = pack8(tmp);
                } else {
                    xv[q] = make_uint4(0, 0, 0, 0);
                }
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int idx = tid + q * LMX_THREADS;
                const int ar = idx >> 3, ac = (idx & 7) * 8;
                if (ar < R) {
                    load8(e.a + (long long)ar * p.hi, k0 + ac, k_end, vec, tmp);
                    av[q] = pack8(tmp);
                } else {
                    av[q] = make_uint4(0, 0, 0, 0);
                }
            }
        };
        if (k_begin < k_end) fetch(k_begin);
        for (int k0 = k_begin; k0 < k_end; k0 += SHRINK_KSTEP) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int idx = tid + q * LMX_THREADS;
                *reinterpret_cast<uint4*>(&xs[idx >> 3][(idx & 7) * 8]) = xv[q];
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int idx = tid + q * LMX_THREADS;
                const int ar = idx >> 3, ac = (idx & 7) * 8;
                if (ar < nrows_a) *reinterpret_cast<uint4*>(&as[ar][ac]) = av[q];
            }
            __syncthreads();
            if (k0 + SHRINK_KSTEP < k_end) fetch(k0 + SHRINK_KSTEP);
            if (mt * 16 < nt) {
#pragma unroll
                for (int kk = 0; kk < SHRINK_KSTEP; kk += 16) {
                    u32 af[4];
                    const int r0 = mt * 16 + gq;
                    af[0] = *reinterpret_cast<const u32*>(&xs[r0][kk + tq * 2]);
                    af[1] = *reinterpret_cast<const u32*>(&xs[r0 + 8][kk + tq * 2]);
                    af[2] = *reinterpret_cast<const u32*>(&xs[r0][kk + tq * 2 + 8]);
                    af[3] = *reinterpret_cast<const u32*>(&xs[r0 + 8][kk + tq * 2 + 8]);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        const int nb = nbase + 2 * i;
                        if (nb < ntile8) {
                            u32 bf[2];
                            bf[0] = *reinterpret_cast<const u32*>(&as[nb * 8 + gq][kk + tq * 2]);
                            bf[1] = *reinterpret_cast<const u32*>(&as[nb * 8 + gq][kk + tq * 2 + 8]);
                            mma16816<BF16>(acc[i], af, bf);
                        }
                    }
                }
            }
            __syncthreads();
        }
        float* out = p.partial + ((long long)(s * p.ksplit + c) * p.T) * p.table.max_rank;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int nb = nbase + 2 * i;
            if (nb < ntile8) {
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    const int row = mt * 16 + gq + ((h & 2) ? 8 : 0);
                    const int r = nb * 8 + tq * 2 + (h & 1);
                    if (row < nt && r < R)
                        out[(long long)tokens[row] * p.table.max_rank + r] = acc[i][h];
                }
            }
        }
        __syncthreads();
    }
}

// u[s, t, r] = sum_c partial[s, c, t, r] where token t's adapter has rank > r, else 0: the
// standalone shrink's output (lora_apply skips this and lets expand read the partials).
__device__ void shrink_reduce(const ReduceArgs& p) {
    const int R = p.table.max_rank;
    const long long total = (long long)p.slices.count * p.T * R;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(idx % R);
        const int t = (int)((idx / R) % p.T);
        const int s = (int)(idx / ((long long)R * p.T));
        const int slot = p.slot_of_token[t];
        float v = 0.f;
        if (slot >= 0 && slot < p.table.num_slots) {
            const AdapterEntry e = read_entry(p.table, slot, p.slices.module_id[s]);
            if (r < e.rank) {
#pragma unroll 16
            for (int c = 0; c < p.ksplit; ++c)
                    v += p.partial[(((long long)s * p.ksplit + c) * p.T + t) * R + r];
            }
        }
        p.u[idx] = v;
    }
}

extern "C" __global__ void __launch_bounds__(LMX_THREADS, 2) lora_shrink_decode_bf16(const ShrinkArgs p) { shrink_decode<true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 2) lora_shrink_decode_f16(const ShrinkArgs p) { shrink_decode<false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 2) lora_shrink_tile_bf16(const ShrinkArgs p) { shrink_tile<true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 2) lora_shrink_tile_f16(const ShrinkArgs p) { shrink_tile<false>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS) lora_shrink_reduce(const ReduceArgs p) { shrink_reduce(p); }
