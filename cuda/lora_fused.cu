// The fused decode apply (T <= 64): shrink and expand of one lora_apply in a single launch, so an
// apply is one kernel with no whole-grid dependency between its halves. Blocks take roles by
// ticket (an atomic counter in the segments' fused workspace, lora_common.cuh), dense over the
// step's items: tickets [0, S * n * ksplit) are split-K shrink blocks (one item, one split: the
// two-kernel path's shrink_decode_item, so the partials are bit for bit the same), the next
// S * n * col_groups are expand blocks (one item, col_steps x 256 output columns), the rest exit.
// An expand block copies its first B tiles (cp.async) and y values, then waits on its item's
// completion counter, which the item's ksplit shrink blocks bump after their partials are
// written; it only ever waits on smaller tickets, blocks that already run, so no order of block
// dispatch can deadlock it (the single-pass scheme of Merrill & Garland, "Single-pass Parallel
// Prefix Scan with Decoupled Look-back", 2016). Then it streams its column steps with the next
// step's B in flight. The last block to finish zeroes the workspace: no memset node, and a
// captured graph replays as is. lora_common.cuh and lora_shrink_decode.cuh are prepended.

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
__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// Partials written by other blocks of this launch: read at L2, never from a stale L1 line.
__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// 16-byte chunks of a staged B row: odd, so 8 threads reading their rows hit distinct banks.
__device__ __forceinline__ int fused_row_chunks(int rc) { return (rc / 8) | 1; }

template <bool BF16>
__device__ __forceinline__ void fused_shrink(const FusedArgs& p, int* counter, int s, int item, int c,
                                             unsigned char* sm) {
    const WorkItem w = work_item(p.segments, p.max_items, p.T, item);
    if (w.count == 0) return;  // uniform over the block
    const AdapterEntry e = read_entry(p.table, w.slot, p.slices.module_id[s]);
    if (e.rank > 0) {
        const int k_begin = c * p.kchunk;
        const int k_end = min(p.hi, k_begin + p.kchunk);
        float* out = p.partial + ((long long)(s * p.ksplit + c) * p.T) * p.table.max_rank;
        shrink_decode_item<BF16>(p.x, p.x_stride, p.hi, p.table.max_rank, w, e, k_begin, k_end, out,
                                 reinterpret_cast<int*>(sm), reinterpret_cast<u16*>(sm + FUSED_SMEM_HEAD));
    }
    // publish: every thread's partial stores are ordered before the counter bump (fence, barrier)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(counter, 1);
}

template <bool BF16>
__device__ __forceinline__ void fused_expand(const FusedArgs& p, const int* counter, int s, int item, int g,
                                             unsigned char* sm) {
    const int module_id = p.slices.module_id[s], off = p.slices.out_offset[s], ho = p.slices.out_size[s];
    const int o0 = g * p.col_steps * FUSED_COLS;
    if (o0 >= ho) return;
    const WorkItem w = work_item(p.segments, p.max_items, p.T, item);
    if (w.count == 0) return;
    const AdapterEntry e = read_entry(p.table, w.slot, module_id);
    const int R = e.rank;
    if (R == 0) return;  // uniform over the block
    const int nt = min(DECODE_TOKENS, w.count);
    const int rc = (R + 7) & ~7, nq = rc / 8;
    const int pitch = fused_row_chunks(rc) * 8;  // halves
    const int rc_max = (p.table.max_rank + 7) & ~7;
    int* tokens = reinterpret_cast<int*>(sm);
    float* su = reinterpret_cast<float*>(sm + FUSED_SMEM_HEAD);
    u16* bs = reinterpret_cast<u16*>(sm + FUSED_SMEM_HEAD + DECODE_TOKENS * rc_max * 4);
    const int o_end = min(ho, o0 + p.col_steps * FUSED_COLS);
    const int nsteps = (o_end - o0 + FUSED_COLS - 1) / FUSED_COLS;
    const bool vec = (R % 8 == 0) && ((reinterpret_cast<u64>(e.b) & 15) == 0);
    if (threadIdx.x < nt) tokens[threadIdx.x] = w.tokens[threadIdx.x];
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
    stage(1);
    __syncthreads();  // tokens
    u16 yv[DECODE_TOKENS], yn[DECODE_TOKENS];
    u16 sv = 0, sn = 0;
    auto load_y = [&](int j, u16* yo, u16& so) {
        const int o = o0 + j * FUSED_COLS + threadIdx.x;
        const bool live = j < nsteps && o < o_end;
#pragma unroll
        for (int t = 0; t < DECODE_TOKENS; ++t)
            yo[t] = (live && t < nt) ? p.y[(long long)tokens[t] * p.y_stride + off + o] : (u16)0;
        so = (live && e.scale) ? e.scale[o] : (u16)0;
    };
    load_y(0, yv, sv);  // y does not depend on the shrink: in flight during the wait
    if (threadIdx.x == 0) {
        while (ld_acquire(counter) < p.ksplit) __nanosleep(100);
    }
    __syncthreads();
    // u = the item's partials summed over the splits (same order as the two-kernel expand)
    const float* part = p.partial + (long long)s * p.ksplit * p.T * p.table.max_rank;
    for (int idx = threadIdx.x; idx < nt * rc; idx += LMX_THREADS) {
        const int i = idx / rc, r = idx - i * rc;
        float v = 0.f;
        if (r < R) {
            const long long t = tokens[i];
#pragma unroll 16
            for (int c = 0; c < p.ksplit; ++c) v += ld_cg(part + ((long long)c * p.T + t) * p.table.max_rank + r);
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
            float acc[DECODE_TOKENS];
#pragma unroll
            for (int t = 0; t < DECODE_TOKENS; ++t) acc[t] = 0.f;
            for (int q = 0; q < nq; ++q) {
                u16 bv[8];
                unpack8(*reinterpret_cast<const uint4*>(brow + q * 8), bv);
                float bf[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) bf[k] = to_f32<BF16>(bv[k]);
#pragma unroll
                for (int t = 0; t < DECODE_TOKENS; ++t) {
                    if (t < nt) {
                        const float* ur = su + t * rc + q * 8;
#pragma unroll
                        for (int k = 0; k < 8; ++k) acc[t] += ur[k] * bf[k];
                    }
                }
            }
            const float sc = to_f32<BF16>(sv);
#pragma unroll
            for (int t = 0; t < DECODE_TOKENS; ++t) {
                if (t < nt) {
                    float v = to_f32<BF16>(yv[t]) + acc[t];
                    if (e.scale) v *= sc;
                    p.y[(long long)tokens[t] * p.y_stride + off + o] = from_f32<BF16>(v);
                }
            }
        }
        __syncthreads();  // stage j & 1 is read: step j + 2 may land in it
        stage(j + 2);
#pragma unroll
        for (int t = 0; t < DECODE_TOKENS; ++t) yv[t] = yn[t];
        sv = sn;
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
}

template <bool BF16>
__device__ void fused_decode(const FusedArgs& p) {
    extern __shared__ __align__(16) unsigned char fsm[];
    __shared__ int ticket, items, last;
    int* ws = fused_workspace(const_cast<int*>(p.segments), p.max_items, p.T, p.table.num_slots);
    if (threadIdx.x == 0) ticket = atomicAdd(&ws[0], 1);
    if (threadIdx.x == 32) items = min(p.segments[0], p.max_items);  // same trip as the ticket
    __syncthreads();
    const int t = ticket, n = items;
    const int S = p.slices.count;
    const int n_shrink = S * n * p.ksplit;
    int* counters = ws + LMX_FUSED_WS_FIXED;
    if (t < n_shrink) {
        const int per_s = n * p.ksplit;
        const int s = t / per_s, rem = t - s * per_s, item = rem / p.ksplit;
        fused_shrink<BF16>(p, counters + s * p.max_items + item, s, item, rem - item * p.ksplit, fsm);
    } else if (n > 0) {
        const int e = t - n_shrink, per_s = n * p.col_groups;
        const int s = e / per_s, rem = e - s * per_s, item = rem / p.col_groups;
        if (s < S) fused_expand<BF16>(p, counters + s * p.max_items + item, s, item, rem - item * p.col_groups, fsm);
    }
    // the last block to finish leaves the workspace zeroed for the next launch
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&ws[1], 1) == (int)gridDim.x - 1;
    }
    __syncthreads();
    if (last) {
        for (int i = threadIdx.x; i < LMX_MAX_SLICES * p.max_items; i += blockDim.x) counters[i] = 0;
        if (threadIdx.x == 0) {
            ws[0] = 0;
            ws[1] = 0;
        }
    }
}

extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_fused_decode_bf16(const FusedArgs p) { fused_decode<true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS, 3) lora_fused_decode_f16(const FusedArgs p) { fused_decode<false>(p); }
