// The decode shrink of one work item and one split of the reduction dim, shared by the two-kernel
// path (lora_shrink.cu) and the fused decode kernel (lora_fused.cu): both give a token the same
// partial sums, bit for bit. The loader prepends this after lora_common.cuh where a family needs it.

// CUDA cores, items of <= DECODE_TOKENS tokens. The item's x chunk is staged in shared memory; a
// lane holds DECODE_A_SLOTS 16-byte pieces of A in registers. With np 256-element passes over the
// chunk (np <= P, P in {1, 2, 4}: three instantiations keep the fused kernel within its 80
// registers, four spilled), a warp takes 8 / P rank rows a round (rows w, w + 8, ...), so a short
// chunk puts more rows in flight at once (rank 64 over 256 elements: one round of A loads, not
// four dependent ones).
// The first round's A loads are issued before the x loads, so the two latencies overlap. Each
// row's dot product sums its passes in order and is reduced with shuffles: the same sums whatever
// the number of rows a round.
#define DECODE_TOKENS 8
#define DECODE_MAX_CHUNK 1024
#define DECODE_A_SLOTS 8  // 16-byte pieces of A a lane holds

template <int P>
__device__ __forceinline__ void load_a_round(const u16* a, int hi, int row0, int R, int np, int k_begin, int k_end,
                                             int lane, bool vec, uint4 out[DECODE_A_SLOTS / P][P]) {
#pragma unroll
    for (int h = 0; h < DECODE_A_SLOTS / P; ++h) {
        const int row = row0 + 8 * h;
#pragma unroll
        for (int q = 0; q < P; ++q) {
            u16 v[8];
            if (row < R && q < np) {
                load8(a + (long long)row * hi, k_begin + q * 256 + lane * 8, k_end, vec, v);
                out[h][q] = pack8(v);
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

template <bool BF16, int P>
__device__ __forceinline__ void shrink_decode_passes(const u16* x, long long x_stride, int hi, int max_rank,
                                                     int cnt, int np, const AdapterEntry& e, int k_begin, int k_end,
                                                     bool vec, float* out, const int* tokens, u16* xs) {
    constexpr int RW = DECODE_A_SLOTS / P;  // rank rows a warp takes a round
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int R = e.rank;
    uint4 a[RW][P];
    load_a_round<P>(e.a, hi, warp, R, np, k_begin, k_end, lane, vec, a);  // in flight now
    for (int idx = threadIdx.x; idx < cnt * np * 32; idx += blockDim.x) {  // x, 8 elements a thread
        const int i = idx / (np * 32), k = (idx % (np * 32)) * 8;
        u16 v[8];
        load8(x + (long long)tokens[i] * x_stride, k_begin + k, k_end, vec, v);
        *reinterpret_cast<uint4*>(&xs[i * DECODE_MAX_CHUNK + k]) = pack8(v);
    }
    __syncthreads();
    for (int r0 = warp; r0 < R; r0 += 8 * RW) {
        if (r0 != warp) load_a_round<P>(e.a, hi, r0, R, np, k_begin, k_end, lane, vec, a);
        for (int i = 0; i < cnt; ++i) {
            float sum[RW];
#pragma unroll
            for (int h = 0; h < RW; ++h) sum[h] = 0.f;
#pragma unroll
            for (int q = 0; q < P; ++q) {
                if (q >= np) break;
                const uint4 xv = *reinterpret_cast<const uint4*>(&xs[i * DECODE_MAX_CHUNK + q * 256 + lane * 8]);
#pragma unroll
                for (int h = 0; h < RW; ++h)
                    if (r0 + 8 * h < R) sum[h] += dot8<BF16>(a[h][q], xv);  // warp-uniform
            }
            const long long base = (long long)tokens[i] * max_rank;
#pragma unroll
            for (int h = 0; h < RW; ++h) {
                if (r0 + 8 * h < R) {
#pragma unroll
                    for (int off = 16; off > 0; off >>= 1) sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], off);
                    if (lane == h) out[base + r0 + 8 * h] = sum[h];
                }
            }
        }
    }
}

// out[t * max_rank + r] = sum over [k_begin, k_end) of x[t, k] * A[r, k] for the item's tokens t
// and r < e.rank (> 0). tokens: DECODE_TOKENS ints of shared memory holding the item's first
// min(count, DECODE_TOKENS) tokens, written by the caller before a barrier (with the entry read,
// so the x loads wait on no further trip); xs: DECODE_TOKENS rows of DECODE_MAX_CHUNK halves of
// shared memory (16-byte aligned). Every thread of the block calls it; it ends with a barrier, so
// the caller may reuse tokens and xs at once.
template <bool BF16, bool WIDE>
__device__ __forceinline__ void shrink_decode_item(const u16* x, long long x_stride, int hi, int max_rank,
                                                   const WorkItem& w, const AdapterEntry& e, int k_begin,
                                                   int k_end, float* out, const int* tokens, u16* xs) {
    const int passes = (k_end - k_begin + 255) >> 8;  // <= 4 (planner keeps kchunk <= 1024)
    const bool vec = (hi % 8 == 0) && (x_stride % 8 == 0) && ((reinterpret_cast<u64>(x) & 15) == 0);
    const int cnt = min(DECODE_TOKENS, w.count);
    if (WIDE && passes == 1)
        shrink_decode_passes<BF16, 1>(x, x_stride, hi, max_rank, cnt, 1, e, k_begin, k_end, vec, out, tokens, xs);
    else if (WIDE && passes == 2)
        shrink_decode_passes<BF16, 2>(x, x_stride, hi, max_rank, cnt, 2, e, k_begin, k_end, vec, out, tokens, xs);
    else
        shrink_decode_passes<BF16, 4>(x, x_stride, hi, max_rank, cnt, passes, e, k_begin, k_end, vec, out, tokens, xs);
    __syncthreads();  // tokens and xs are rewritten by the next item
}

// Stages the item's first DECODE_TOKENS tokens for shrink_decode_item; the caller's next barrier
// publishes them.
__device__ __forceinline__ void stage_item_tokens(const WorkItem& w, int* tokens) {
    if (threadIdx.x < min(DECODE_TOKENS, w.count)) tokens[threadIdx.x] = w.tokens[threadIdx.x];
}
