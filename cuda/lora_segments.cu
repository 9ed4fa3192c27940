// Token segments of one forward step: which tokens use which adapter slot, listed slot by slot and
// cut into work items, computed once per step on the device (histogram, prefix sum, scatter; no
// host sync) and read by every shrink and expand of the step (layout in lora_common.cuh).
// One block: a step has at most a few thousand tokens and slots. lora_common.cuh is prepended.

#define SEG_THREADS 1024

// Exclusive block-wide prefix sums of a and b (every thread passes its values; all must call).
// Returns the block totals through *tot_a, *tot_b.
__device__ __forceinline__ void block_scan2(int& a, int& b, int* tot_a, int* tot_b) {
    __shared__ int wa[SEG_THREADS / 32], wb[SEG_THREADS / 32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int ia = a, ib = b;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int va = __shfl_up_sync(0xffffffffu, ia, off);
        const int vb = __shfl_up_sync(0xffffffffu, ib, off);
        if (lane >= off) {
            ia += va;
            ib += vb;
        }
    }
    if (lane == 31) {
        wa[w] = ia;
        wb[w] = ib;
    }
    __syncthreads();
    if (w == 0) {
        int sa = lane < nw ? wa[lane] : 0, sb = lane < nw ? wb[lane] : 0;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int va = __shfl_up_sync(0xffffffffu, sa, off);
            const int vb = __shfl_up_sync(0xffffffffu, sb, off);
            if (lane >= off) {
                sa += va;
                sb += vb;
            }
        }
        if (lane < nw) {
            wa[lane] = sa;
            wb[lane] = sb;
        }
    }
    __syncthreads();
    const int pa = w ? wa[w - 1] : 0, pb = w ? wb[w - 1] : 0;
    *tot_a = wa[nw - 1];
    *tot_b = wb[nw - 1];
    a = pa + ia - a;
    b = pb + ib - b;
    __syncthreads();  // wa / wb are reused by the next call
}

extern "C" __global__ void __launch_bounds__(SEG_THREADS) lora_segments(const SegmentArgs p) {
    const int M = p.max_items;
    int* hdr = p.segments;
    int* item_slot = hdr + LMX_SEG_HEADER;
    int* item_begin = item_slot + M;
    int* item_count = item_begin + M;
    int* token_idx = item_count + M;
    int* cursor = token_idx + p.T;  // per slot: token count, then the next free index
    const int tid = threadIdx.x;
    for (int i = tid; i < p.num_slots; i += blockDim.x) cursor[i] = 0;
    // the fused decode kernel's workspace starts zeroed (each fused launch leaves it so)
    int* ws = cursor + p.num_slots;
    for (int i = tid; i < LMX_FUSED_WS_WORDS * LMX_MAX_SLICES * M; i += blockDim.x) ws[i] = 0;
    __syncthreads();
    for (int t = tid; t < p.T; t += blockDim.x) {
        const int s = p.slot_of_token[t];
        if (s >= 0 && s < p.num_slots) atomicAdd(&cursor[s], 1);
    }
    __syncthreads();
    int tokens_before = 0, items_before = 0, slots_used = 0;
    for (int base = 0; base < p.num_slots; base += blockDim.x) {
        const int i = base + tid;
        const int c = i < p.num_slots ? cursor[i] : 0;
        int tok = c, itm = (c + p.chunk - 1) / p.chunk, used = 0;
        int tot_tok, tot_itm;
        block_scan2(tok, itm, &tot_tok, &tot_itm);
        used = __syncthreads_count(c > 0);
        tok += tokens_before;
        itm += items_before;
        if (c > 0) {
            cursor[i] = tok;
            for (int j = 0; j * p.chunk < c; ++j) {
                if (itm + j >= M) break;  // cannot happen for the planner's max_items; never overrun
                item_slot[itm + j] = i;
                item_begin[itm + j] = tok + j * p.chunk;
                item_count[itm + j] = min(p.chunk, c - j * p.chunk);
            }
        }
        tokens_before += tot_tok;
        items_before += tot_itm;
        slots_used += used;
    }
    __syncthreads();
    // Order inside a slot's list is the atomics' order: every kernel computes a token's row on its
    // own (same reduction order wherever it sits in an item), so results do not depend on it.
    for (int t = tid; t < p.T; t += blockDim.x) {
        const int s = p.slot_of_token[t];
        if (s >= 0 && s < p.num_slots) token_idx[atomicAdd(&cursor[s], 1)] = t;
    }
    if (tid == 0) {
        hdr[0] = min(items_before, M);
        hdr[1] = tokens_before;
        hdr[2] = slots_used;
        hdr[3] = 0;
    }
}
