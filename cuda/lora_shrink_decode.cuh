// The decode shrink of one work item and one split of the reduction dim, shared by the two-kernel
// path (lora_shrink.cu) and the fused decode kernel (lora_fused.cu): both give a token the same
// partial sums, bit for bit. The loader prepends this after lora_common.cuh where a family needs it.

// CUDA cores, items of <= DECODE_TOKENS tokens. The item's x chunk is staged in shared memory; each
// warp takes rank rows two at a time (r, r + 8), holding their A chunks in registers (16-byte loads,
// issued before the x staging so the two latencies overlap), and reduces one dot product per token
// with shuffles.
#define DECODE_TOKENS 8
#define DECODE_MAX_CHUNK 1024

__device__ __forceinline__ void load_a_rows(const u16* a, int hi, int r, int R, int k_begin, int k_end,
                                            int passes, int lane, bool vec, uint4 out[2][4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = r + 8 * h;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            u16 v[8];
            if (row < R && q < passes) {
                load8(a + (long long)row * hi, k_begin + q * 256 + lane * 8, k_end, vec, v);
                out[h][q] = make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
            } else {
                out[h][q] = make_uint4(0, 0, 0, 0);
            }
        }
    }
}

template <bool BF16>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const u32 aw[4] = {a.x, a.y, a.z, a.w};
    const u32 bw[4] = {b.x, b.y, b.z, b.w};
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        s += to_f32<BF16>((u16)(aw[k] & 0xffff)) * to_f32<BF16>((u16)(bw[k] & 0xffff));
        s += to_f32<BF16>((u16)(aw[k] >> 16)) * to_f32<BF16>((u16)(bw[k] >> 16));
    }
    return s;
}

// Stages the item's first DECODE_TOKENS tokens for shrink_decode_item, in the same memory trip as
// the caller's read of the adapter entry (the x loads then wait on no further trip); the caller's
// next barrier publishes them.
__device__ __forceinline__ void stage_item_tokens(const WorkItem& w, int* tokens) {
    if (threadIdx.x < min(DECODE_TOKENS, w.count)) tokens[threadIdx.x] = w.tokens[threadIdx.x];
}

// out[t * max_rank + r] = sum over [k_begin, k_end) of x[t, k] * A[r, k] for the item's tokens t
// and r < e.rank (> 0). tokens: DECODE_TOKENS ints of shared memory holding the item's tokens
// (stage_item_tokens, then a barrier); xs: DECODE_TOKENS rows of DECODE_MAX_CHUNK halves of shared
// memory (16-byte aligned). Every thread of the block calls it; it ends with a barrier, so the
// caller may reuse tokens and xs at once.
template <bool BF16>
__device__ __forceinline__ void shrink_decode_item(const u16* x, long long x_stride, int hi, int max_rank,
                                                   const WorkItem& w, const AdapterEntry& e, int k_begin,
                                                   int k_end, float* out, const int* tokens, u16* xs) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int passes = (k_end - k_begin + 255) >> 8;  // <= 4 (planner keeps kchunk <= 1024)
    const bool vec = (hi % 8 == 0) && (x_stride % 8 == 0) && ((reinterpret_cast<u64>(x) & 15) == 0);
    const int R = e.rank;
    uint4 a[2][4];
    load_a_rows(e.a, hi, warp, R, k_begin, k_end, passes, lane, vec, a);  // in flight now
    const int cnt = min(DECODE_TOKENS, w.count);
    const int per_row = passes * 32;  // 8-element chunks per staged row
    for (int idx = threadIdx.x; idx < cnt * per_row; idx += blockDim.x) {
        const int i = idx / per_row, k = (idx % per_row) * 8;
        u16 v[8];
        load8(x + (long long)tokens[i] * x_stride, k_begin + k, k_end, vec, v);
        *reinterpret_cast<uint4*>(&xs[i * DECODE_MAX_CHUNK + k]) =
            make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
    }
    __syncthreads();
    for (int r = warp; r < R; r += 16) {
        if (r != warp) load_a_rows(e.a, hi, r, R, k_begin, k_end, passes, lane, vec, a);
        for (int i = 0; i < cnt; ++i) {
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (q < passes) {
                    const uint4 xv = *reinterpret_cast<const uint4*>(&xs[i * DECODE_MAX_CHUNK + q * 256 + lane * 8]);
                    sum0 += dot8<BF16>(a[0][q], xv);
                    sum1 += dot8<BF16>(a[1][q], xv);
                }
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                sum0 += __shfl_xor_sync(0xffffffffu, sum0, off);
                sum1 += __shfl_xor_sync(0xffffffffu, sum1, off);
            }
            const long long base = (long long)tokens[i] * max_rank;
            if (lane == 0) out[base + r] = sum0;
            if (lane == 1 && r + 8 < R) out[base + r + 8] = sum1;
        }
    }
    __syncthreads();  // tokens and xs are rewritten by the next item
}
