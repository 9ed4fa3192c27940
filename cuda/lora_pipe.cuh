// The pipelined kernels' pieces (lora_prefill.cu's shrink and expand): ring geometry, cp.async
// copies, ldmatrix fragments, the k-step and tile sums, and the work item a block takes. Kept apart
// so another pipelined family can take them; rust/src/cuda/nvrtc.rs prepends it after lora_common.cuh.

#define PF_KSTEP 64
#define PF_SHRINK_STAGES 4   // k-steps of x and A in the ring (3 in flight while one is multiplied)
// ... of a WT kernel: deeper where its stages are small enough to keep 3 blocks an SM (rust/src/cuda/
// plan/pipe.rs pipe_shrink_stages mirrors it)
__device__ constexpr int pf_shrink_stages(int wt) { return wt == 1 ? 6 : (wt == 2 ? 5 : PF_SHRINK_STAGES); }
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
// the same copy to a shared address already converted (pf_smem_addr once an item, not once a copy)
__device__ __forceinline__ void pf_cp16_sa(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
// Four 8x8 matrices of 16-bit values out of shared memory in one instruction: lane l names row
// l % 8 of matrix l / 8 (16 bytes), and gets in out[m] its pair of matrix m in the mma fragment
// layout (row l / 4, columns 2 (l % 4) and + 1): what four 32-bit loads a matrix fetched before.
__device__ __forceinline__ void pf_ldsm4(u32 out[4], u32 row_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(row_addr));
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

// k-step kj.. of one shrink block's copies into a ring stage (shared address xs, pointer stage):
// this thread's x rows r0 and r0 + 32 of the tile and A rows r0 + 32q (< nrows_a), columns
// cc0..cc0+7, from sources set once an item (x_row: nullptr past the item's tokens; a_row: A row r0
// at the block's k_begin), so a k-step only adds kj (the per-copy index arithmetic was a third of
// the loop's instructions: ncu, T = 2048 rank 64). Rows past the tokens or R, and columns past
// k_end, are zero-filled; `*_any`: a mapped address the zero-byte copies name. WT > 0: 16 WT A rows.
template <int WT>
__device__ __forceinline__ void pf_copy_shrink_step(u32 xs, u16* stage, int kj, const u16* const x_row[2], const u16* a_row,
                                                    long long a_rows32, int k_begin, int k_end, int cc0, int r0, int R,
                                                    int nrows_a, bool avec, const u16* x_any, const u16* a_any) {
    const u32 as = xs + LMX_TILE_T * PF_PITCH * 2;
    const bool kin = k_begin + kj + cc0 < k_end;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const bool ok = kin && x_row[q] != nullptr;
        pf_cp16_sa(xs + ((r0 + 32 * q) * PF_PITCH + cc0) * 2, ok ? x_row[q] + kj : x_any, ok);
    }
#pragma unroll
    for (int q = 0; q < (WT > 0 ? (16 * WT + 31) / 32 : 4); ++q) {
        const int r = r0 + 32 * q;
        if (r < nrows_a) {
            const bool ok = kin && r < R;
            const u16* src = a_row + q * a_rows32 + kj;
            if (avec) {
                pf_cp16_sa(as + (r * PF_PITCH + cc0) * 2, ok ? src : a_any, ok);
            } else {  // an unaligned adapter row: plain loads, visible after the step's barrier
                u16 v[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) v[i] = (ok && k_begin + kj + cc0 + i < k_end) ? src[i] : (u16)0;
                *reinterpret_cast<uint4*>(stage + (LMX_TILE_T + r) * PF_PITCH + cc0) = pack8(v);
            }
        }
    }
}

// Column tile o0.. of one expand block's copies into a ring stage (shared address bs, pointer
// stage): the B rows o0.. (b_chunks: this thread's BQ chunks of 8 ranks as (row, rank / 8), 16 bits
// each, 0xffff none) and the y tile's rows r0 and r0 + 32 at column cc0 (y_row: nullptr past the
// item's tokens), from sources set once an item; zero-filled past ho and R. `y_any`: a mapped
// address the zero-byte copies name.
template <int BQ>
__device__ __forceinline__ void pf_copy_expand_tile(u32 bs, u16* stage, int o0, u64 b_chunks, int bpitch, u16* const y_row[2],
                                                    int cc0, int r0, const u16* b, int R, int ho, bool bvec, const u16* y_any) {
    const u32 ys = bs + PF_OTILE * bpitch * 2;
#pragma unroll
    for (int q = 0; q < BQ; ++q) {
        const u32 chunk = (u32)(b_chunks >> (16 * q)) & 0xffffu;
        if (chunk != 0xffffu) {
            const int o = chunk & 63, r = (chunk >> 6) * 8;
            const u16* src = b + (long long)(o0 + o) * R + r;
            if (bvec) {
                const bool ok = o0 + o < ho && r < R;
                pf_cp16_sa(bs + (o * bpitch + r) * 2, ok ? src : b, ok);
            } else {  // odd rank or unaligned B: plain loads, visible after the tile's barrier
                u16 v[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) v[i] = (o0 + o < ho && r + i < R) ? src[i] : (u16)0;
                *reinterpret_cast<uint4*>(stage + o * bpitch + r) = pack8(v);
            }
        }
    }
    const bool cin = o0 + cc0 < ho;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const bool ok = cin && y_row[q] != nullptr;
        pf_cp16_sa(ys + ((r0 + 32 * q) * PF_PITCH + cc0) * 2, ok ? y_row[q] + o0 : y_any, ok);
    }
}

// One k-step of a warp's shrink sums from a ring stage (shared address xs): x rows mt*16 +
// (lane & 15), columns kk + 8 (lane >> 4), the A fragment in one ldmatrix; A rows of the warp's rank
// tiles by pairs (b_lane: the first pair's row and column for this lane; b_second: lanes 16..31's
// offset to the pair's second tile, b_second_last the last pair's, 0 where it has none), two
// fragments an ldmatrix. acc[i]: rank tile nbase + 2i of the warp's 16 rows (b_tiles of them).
template <bool BF16, int NACC>
__device__ __forceinline__ void pf_mma_shrink_step(float acc[NACC][4], u32 xs, int mt, int lane, u32 b_lane, int b_pairs, int b_tiles,
                                                   u32 b_second, u32 b_second_last) {
    const u32 as = xs + LMX_TILE_T * PF_PITCH * 2;
    const u32 x_lane = xs + ((mt * 16 + (lane & 15)) * PF_PITCH + (lane >> 4) * 8) * 2;
#pragma unroll
    for (int kk = 0; kk < PF_KSTEP; kk += 16) {
        u32 af[4];
        pf_ldsm4(af, x_lane + kk * 2);
#pragma unroll
        for (int q = 0; q < NACC / 2; ++q) {
            if (q < b_pairs) {
                u32 bf[4];
                pf_ldsm4(bf, as + b_lane + q * 32 * PF_PITCH * 2 + (q + 1 < b_pairs ? b_second : b_second_last) + kk * 2);
                mma16816<BF16>(acc[2 * q], af, bf);
                if (2 * q + 1 < b_tiles) mma16816<BF16>(acc[2 * q + 1], af, bf + 2);
            }
        }
    }
}

// A warp's 16 rows x 32 columns of one expand tile from a ring stage (shared address bs): B rows
// nh*32 + 8i + (lane & 7) (tiles i, i + 1: lanes 16..31), columns k*16 + 8 ((lane >> 3) & 1), two
// tiles' fragments an ldmatrix; af: the warp's u fragments (KS k16 steps, rk ranks padded to 16).
template <bool BF16, int KS>
__device__ __forceinline__ void pf_mma_expand_tile(float acc[4][4], const u32 af[KS][4], u32 bs, int nh, int lane, int bpitch, int rk) {
    const u32 b_lane = bs + ((nh * 32 + ((lane >> 4) & 1) * 8 + (lane & 7)) * bpitch + ((lane >> 3) & 1) * 8) * 2;
#pragma unroll
    for (int k = 0; k < KS; ++k) {
        if (k * 16 < rk) {
#pragma unroll
            for (int i = 0; i < 4; i += 2) {
                u32 bf[4];
                pf_ldsm4(bf, b_lane + (i * 8 * bpitch + k * 16) * 2);
                mma16816<BF16>(acc[i], af[k], bf);
                mma16816<BF16>(acc[i + 1], af[k], bf + 2);
            }
        }
    }
}

// y + delta back into the warp's 16 x 32 region of the y tile ys, every row and column (Ho is a
// multiple of 8, so a column pair is in the slice or out of it together; the stores skip the rest).
template <bool BF16>
__device__ __forceinline__ void pf_add_y_tile(const float acc[4][4], u16* ys, int mt, int nh, int lane) {
    const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            u32* yp = reinterpret_cast<u32*>(ys + (mt * 16 + gq + hh * 8) * PF_PITCH + nh * 32 + i * 8 + tq * 2);
            const u32 yv = *yp;
            const float v0 = to_f32<BF16>((u16)(yv & 0xffff)) + acc[i][2 * hh];
            const float v1 = to_f32<BF16>((u16)(yv >> 16)) + acc[i][2 * hh + 1];
            *yp = pack2(from_f32<BF16>(v0), from_f32<BF16>(v1));
        }
    }
}

// The same for rows below nt and columns below ho (of the tile at column o0) only, DoRA-scaled
// where `scale` is set: scale[o] * (y + delta).
template <bool BF16>
__device__ __forceinline__ void pf_add_y_tile_scaled(const float acc[4][4], u16* ys, int mt, int nh, int lane, int nt, int o0, int ho,
                                                     const u16* scale) {
    const int gq = lane >> 2, tq = lane & 3;
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
                if (scale) {
                    v0 *= to_f32<BF16>(scale[o0 + col]);
                    v1 *= to_f32<BF16>(scale[o0 + col + 1]);
                }
                *yp = pack2(from_f32<BF16>(v0), from_f32<BF16>(v1));
            }
        }
    }
}

// The warp stores the 16 x 32 region it summed, 16 bytes a lane (rows mt*16 + k and k + 8, k = 0,
// 4, 1, 5, ... by lane quad: a quarter-warp's two rows 4 apart fall in different banks), so no block
// barrier stands between a warp's sums and its stores (the next tile's barrier still frees the
// stage). The tile's columns o0.. of the slice at column `off` of y's rows, ho of them.
__device__ __forceinline__ void pf_store_y_warp(const u16* ys, u16* y, long long y_stride, const int* tokens, int off, int o0, int ho,
                                                int nt, int mt, int nh, int lane) {
    __syncwarp();
    const int quad = lane >> 2;
    const int col = nh * 32 + (lane & 3) * 8;
    if (o0 + col < ho) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int row = mt * 16 + (quad & 1) * 4 + (quad >> 1) + 8 * q;
            if (row < nt)
                *reinterpret_cast<uint4*>(y + (long long)tokens[row] * y_stride + off + o0 + col) =
                    *reinterpret_cast<const uint4*>(ys + row * PF_PITCH + col);
        }
    }
}
