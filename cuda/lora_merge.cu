// The join of a LoRA branch run beside the base GEMM (ops.lora_apply_beside). The branch ran its
// applies, in order, over a zeroed buffer `delta` on a side stream, a DoRA slice's epilogue scaling
// that zero base as it would y (delta = s * (0 + d)); the applies in order over y would have left
// s2 * (s1 * (y + d1) + d2) = s1 * s2 * y + delta. So y = f * y + delta, f the product of the DoRA
// scales of the row's adapter over the slices that cover the column (1 where none): one rounding,
// and exact where f = 1 (a -0 in y comes back +0 where delta is 0). lora_common.cuh is prepended.

template <bool BF16>
__device__ void beside_merge(const MergeArgs& p) {
    __shared__ const u16* scale[LMX_MAX_SLICES];  // the row's DoRA scale of each slice, or null
    const int t = blockIdx.x;
    if (threadIdx.x < p.slices.count) {
        const int slot = p.slot_of_token[t];
        const u16* s = nullptr;
        if (slot >= 0 && slot < p.table.num_slots) {
            const AdapterEntry e = read_entry(p.table, slot, p.slices.module_id[threadIdx.x]);
            if (e.rank > 0) s = e.scale;  // a slice the row's adapter lacks adds nothing and scales nothing
        }
        scale[threadIdx.x] = s;
    }
    __syncthreads();
    u16* y = p.y + (long long)t * p.y_stride;
    const u16* d = p.delta + (long long)t * p.delta_stride;
    const int o0 = (blockIdx.y * blockDim.x + threadIdx.x) * LMX_MERGE_COLS;
    if (o0 >= p.width) return;
    u16 yv[LMX_MERGE_COLS], dv[LMX_MERGE_COLS];
    const bool vec = p.vec && o0 + LMX_MERGE_COLS <= p.width;
    if (vec) {
        unpack8(*reinterpret_cast<const uint4*>(y + o0), yv);
        unpack8(*reinterpret_cast<const uint4*>(d + o0), dv);
    } else {
#pragma unroll
        for (int i = 0; i < LMX_MERGE_COLS; ++i) {
            yv[i] = o0 + i < p.width ? y[o0 + i] : (u16)0;
            dv[i] = o0 + i < p.width ? d[o0 + i] : (u16)0;
        }
    }
    float f[LMX_MERGE_COLS];
#pragma unroll
    for (int i = 0; i < LMX_MERGE_COLS; ++i) f[i] = 1.f;
    for (int s = 0; s < p.slices.count; ++s) {
        const u16* sc = scale[s];
        const int off = p.slices.out_offset[s], size = p.slices.out_size[s];
        if (sc == nullptr || o0 + LMX_MERGE_COLS <= off || o0 >= off + size) continue;
#pragma unroll
        for (int i = 0; i < LMX_MERGE_COLS; ++i) {
            const int o = o0 + i - off;
            if (o >= 0 && o < size) f[i] *= to_f32<BF16>(sc[o]);
        }
    }
#pragma unroll
    for (int i = 0; i < LMX_MERGE_COLS; ++i) yv[i] = from_f32<BF16>(fmaf(f[i], to_f32<BF16>(yv[i]), to_f32<BF16>(dv[i])));
    if (vec) {
        *reinterpret_cast<uint4*>(y + o0) = pack8(yv);
    } else {
#pragma unroll
        for (int i = 0; i < LMX_MERGE_COLS; ++i)
            if (o0 + i < p.width) y[o0 + i] = yv[i];
    }
}

extern "C" __global__ void __launch_bounds__(LMX_THREADS) lora_beside_merge_bf16(const MergeArgs p) { beside_merge<true>(p); }
extern "C" __global__ void __launch_bounds__(LMX_THREADS) lora_beside_merge_f16(const MergeArgs p) { beside_merge<false>(p); }
