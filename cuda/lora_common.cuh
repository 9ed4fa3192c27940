// Shared by every loramux kernel: argument structs (mirrored in rust/src/cuda/launch.rs), 16-bit
// float conversion by PTX (NVRTC 13 ships no cuda_bf16.h/cuda_fp16.h), and the token segments
// (tokens grouped by adapter slot, built once per step by lora_segments.cu).
// rust/src/cuda/nvrtc.rs prepends this file to each kernel family's source; no #include anywhere.

#define LMX_MAX_SLICES 8
#define LMX_TILE_T 64          // tokens grouped together by one block
#define LMX_THREADS 256
#define LMX_ENTRY_I64 4        // slot-table entry: a_addr, b_addr, scale_addr, rank
#define LMX_MODULES 19

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct LoraSlices {
    int count;
    int module_id[LMX_MAX_SLICES];
    int out_offset[LMX_MAX_SLICES];   // first column of the slice in y (expand only)
    int out_size[LMX_MAX_SLICES];     // Ho of the slice (expand only)
};

// Where the adapters are: the slot table, already offset to one layer.
struct LoraTable {
    const long long* layer_base;      // &table[0, layer, 0, 0]
    long long slot_stride;            // int64s between slots = num_layers * 19 * 4
    int num_slots;
    int max_rank;
};

struct ShrinkArgs {
    const u16* x;                     // [T, Hi], row stride x_stride elements
    long long x_stride;
    const int* slot_of_token;         // [T], -1 = no adapter
    const int* segments;              // the step's token segments (layout below)
    float* partial;                   // [S, ksplit, T, max_rank] fp32
    int T;
    int hi;
    int ksplit;
    int kchunk;                       // reduction elements per split (multiple of 32)
    int max_items;                    // work items the segments hold room for (= gridDim.y)
    int split_target;                 // > 0: the split comes from the step's item count (decode_split)
    int merge_items;                  // pipelined kernels: small items of one slot a block merges (pf_item)
    int signal_items;                 // pipelined: an item's last split signals its u in the workspace (lora_prefill.cu)
    LoraTable table;
    LoraSlices slices;
};

struct ExpandArgs {
    const float* partial;             // [S, ksplit, T, max_rank]: summed over ksplit on load
    u16* y;                           // [T, >= sum out_size], row stride y_stride elements
    long long y_stride;
    const int* slot_of_token;
    const int* segments;
    int T;
    int ksplit;
    int ochunk;                       // output columns per block
    int max_items;
    int hi;                           // the shrink's reduction dim (decode_split)
    int split_target;                 // > 0: sum the decode_split of the step's item count (<= ksplit)
    int merge_items;                  // pipelined kernels: small items of one slot a block merges (pf_item)
    int wait_items;                   // pipelined: wait on each item's signal, not on the whole shrink grid
    LoraTable table;
    LoraSlices slices;
};

// The fused decode apply (lora_fused.cu): shrink and expand of a batch of <= 64 tokens in one
// launch: a group of ksplit + col_groups(slice) blocks per (slice, item), roles by ticket in the
// group (the workspace in the segments, below): split-K shrink blocks, then expand blocks of
// col_steps x 256 output columns, each waiting on the group's completion count.
struct FusedArgs {
    const u16* x;                     // [T, Hi], row stride x_stride elements
    long long x_stride;
    u16* y;                           // [T, >= sum out_size], row stride y_stride elements
    long long y_stride;
    int* segments;                    // the step's token segments, fused workspace included
    float* partial;                   // [S, ksplit, T, max_rank] fp32
    int T;
    int hi;
    int ksplit;
    int kchunk;                       // reduction elements per split (multiple of 256, <= 1024)
    int max_items;                    // work items the segments hold room for (= grid_items)
    int col_steps;                    // 256-column steps of one expand block
    int col_groups;                   // expand blocks per item of the widest slice (the kernel derives each slice's)
    int smem_bytes;                   // dynamic shared memory of the launch
    int split_target;                 // > 0: split and column steps from the step's item count
    int expand_target;                // expand blocks the device-sized column steps aim for
    // the shape for max_items items (lora_fused.cu fused_shape), computed by the host
    // (rust/src/cuda/plan/fused.rs fused_shape): blocks are placed with no arithmetic of their own
    int placed_ksplit;
    int placed_kchunk;
    int placed_col_steps;
    int placed_groups[LMX_MAX_SLICES];  // expand blocks per item of each slice at placed_col_steps
    LoraTable table;
    LoraSlices slices;
};

// Builds the segments of one step from slot_of_token (lora_segments.cu).
struct SegmentArgs {
    const int* slot_of_token;         // [T]
    int* segments;                    // [LMX_SEG_HEADER + 3 * max_items + T + num_slots + fused workspace]
    int T;
    int num_slots;
    int max_items;
    int chunk;                        // tokens per work item at most
};

struct ReduceArgs {
    const float* partial;             // [S, ksplit, T, max_rank]
    float* u;                         // [S, T, max_rank], fully written
    const int* slot_of_token;
    int T;
    int ksplit;
    LoraTable table;
    LoraSlices slices;
};

// The join of a LoRA branch run beside the base GEMM (lora_merge.cu): y = f * y + delta per row,
// f the row's DoRA scales over the slices covering a column. Slices here may overlap: each apply
// of the branch starts at column 0 of y.
#define LMX_MERGE_COLS 8       // columns a thread of the merge takes: 16 bytes of y and of delta
struct MergeArgs {
    u16* y;                           // [T, >= width], row stride y_stride elements
    long long y_stride;
    const u16* delta;                 // [T, >= width], row stride delta_stride elements
    long long delta_stride;
    const int* slot_of_token;         // [T]
    int T;
    int width;
    int vec;                          // y, delta and their strides allow 16-byte accesses
    LoraTable table;
    LoraSlices slices;
};

// ---- 16-bit floats ----------------------------------------------------------------------------

template <bool BF16> __device__ __forceinline__ float to_f32(u16 v);
template <> __device__ __forceinline__ float to_f32<true>(u16 v) {
    return __uint_as_float(((u32)v) << 16);
}
template <> __device__ __forceinline__ float to_f32<false>(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
template <bool BF16> __device__ __forceinline__ u16 from_f32(float f);
template <> __device__ __forceinline__ u16 from_f32<true>(float f) {
    u16 v;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}
template <> __device__ __forceinline__ u16 from_f32<false>(float f) {
    u16 v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}
__device__ __forceinline__ u32 pack2(u16 lo, u16 hi) { return ((u32)hi << 16) | (u32)lo; }
__device__ __forceinline__ uint4 pack8(const u16 v[8]) {
    return make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
}

// Loads 8 consecutive 16-bit values starting at element k of row (row has `len` elements),
// zero past the end; one 16-byte load when the caller proved alignment (`vec`).
__device__ __forceinline__ void load8(const u16* row, int k, int len, bool vec, u16 out[8]) {
    if (vec && k + 8 <= len) {
        uint4 v = *reinterpret_cast<const uint4*>(row + k);
        out[0] = v.x & 0xffff; out[1] = v.x >> 16; out[2] = v.y & 0xffff; out[3] = v.y >> 16;
        out[4] = v.z & 0xffff; out[5] = v.z >> 16; out[6] = v.w & 0xffff; out[7] = v.w >> 16;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = (k + i < len) ? row[k + i] : (u16)0;
    }
}

__device__ __forceinline__ void unpack8(uint4 v, u16 out[8]) {
    out[0] = v.x & 0xffff; out[1] = v.x >> 16; out[2] = v.y & 0xffff; out[3] = v.y >> 16;
    out[4] = v.z & 0xffff; out[5] = v.z >> 16; out[6] = v.w & 0xffff; out[7] = v.w >> 16;
}

// ---- slot table --------------------------------------------------------------------------------

struct AdapterEntry {
    const u16* a;      // [rank, Hi]
    const u16* b;      // [Ho, rank]
    const u16* scale;  // [Ho] or null
    int rank;
};

__device__ __forceinline__ AdapterEntry read_entry(const LoraTable& t, int slot, int module_id) {
    const long long* e = t.layer_base + (long long)slot * t.slot_stride + module_id * LMX_ENTRY_I64;
    AdapterEntry r;
    r.a = reinterpret_cast<const u16*>(e[0]);
    r.b = reinterpret_cast<const u16*>(e[1]);
    r.scale = reinterpret_cast<const u16*>(e[2]);
    int rank = (int)(e[3] & 0xffffffffLL);
    // A rank past max_rank would index past u's width: the cache never writes one; clamp so a
    // corrupt table cannot make the kernel write out of bounds.
    r.rank = rank < 0 ? 0 : (rank > t.max_rank ? t.max_rank : rank);
    return r;
}

// ---- token segments (built once per step by lora_segments) ------------------------------------
// The tokens of each adapter slot, listed together (token_idx), cut into work items of at most
// `chunk` tokens of one slot: a block takes one item, so it reads its adapter's weights once for
// all the item's tokens whatever the order of the tokens in the batch. The grid holds fewer blocks
// along y than the bound on items (most mappings have far fewer); a block takes items
// blockIdx.y, blockIdx.y + gridDim.y, ... Layout (int32):
//   [0] items, [1] tokens with an adapter, [2] distinct slots, [3] unused,
//   item_slot[max_items], item_begin[max_items] (index into token_idx), item_count[max_items],
//   token_idx[T], then num_slots ints of scratch (the builder's histogram and cursors), then the
//   fused decode kernel's workspace: per (slice, item), LMX_FUSED_WS_WORDS ints (the block group's
//   next ticket, its completion count), LMX_MAX_SLICES * max_items groups; the pipelined prefill
//   shrink (lora_prefill.cu) counts an item's finished splits in the first word and, launched with
//   signal_items, bumps the second once it has summed the item's u; the expand launched with
//   wait_items waits on that word and counts itself in, the last one wrapping it to zero (the
//   launcher pairs the two: a signal no expand waits on would stay). The builder zeroes it and
//   every fused launch and pipelined pair leaves it zeroed, so launches and graph replays need no
//   memset.
//   Launches sharing one segments buffer must be stream-ordered.
#define LMX_SEG_HEADER 4
#define LMX_FUSED_WS_WORDS 2

__device__ __forceinline__ int* fused_workspace(int* seg, int max_items, int T, int num_slots) {
    return seg + LMX_SEG_HEADER + 3 * max_items + T + num_slots;
}

struct WorkItem {
    int slot;
    int count;        // 0: no item for this block
    int items;        // the step's item count (seg[0]); 0 where i >= max_items
    const int* tokens;
};

// Work item i (< max_items) of the step; count 0 past the last one. The header and the item's
// fields are loaded together (no branch between them), one dependent memory trip, not two.
// Blocks take items blockIdx.y, + gridDim.y, ... while work_item(..).count > 0 (items are dense).
__device__ __forceinline__ WorkItem work_item(const int* seg, int max_items, int T, int i) {
    WorkItem w;
    w.slot = -1;
    w.count = 0;
    w.items = 0;
    w.tokens = seg + LMX_SEG_HEADER + 3 * max_items;
    if (i >= max_items) return w;
    const int* item = seg + LMX_SEG_HEADER;
    const int n = seg[0];
    w.items = min(max(n, 0), max_items);
    const int slot = item[i];
    const int begin = item[max_items + i];
    const int count = item[2 * max_items + i];
    // Clamped so a corrupt buffer cannot make a kernel read or write past T.
    if (i >= n || begin < 0 || count <= 0 || begin >= T) return w;
    w.slot = slot;
    w.count = min(count, T - begin);
    w.tokens += begin;
    return w;
}

// The decode split from the step's real item count (rust/src/cuda/plan/shrink.rs decode_split mirrors it):
// the launch is sized on the host for any count (grid and partials for the most splits), the
// device knows the count (seg[0]) and takes about `target` shrink blocks over n items x S slices:
// splits of 256-element granules, at most 1024 elements (DECODE_MAX_CHUNK). The two-kernel shrink,
// its expand and the fused kernel all derive the same split from the same count and target, so a
// token's partials (and rows) are bit for bit the same on every path given the same target (the
// built-in targets differ per path: fused 264, grouped 528, flat 132; the tests force one).
struct DecodeSplit {
    int ksplit;
    int kchunk;
};
__device__ __forceinline__ DecodeSplit decode_split(int n_items, int num_slices, int hi, int target) {
    const int groups = max(1, n_items * num_slices);
    const int want = max(1, (target + groups - 1) / groups);
    const int ks = min(want, max(1, (hi + 255) / 256));
    const int kchunk = min(1024, ((hi + ks - 1) / ks + 255) / 256 * 256);
    DecodeSplit d;
    d.kchunk = kchunk;
    d.ksplit = max(1, (hi + kchunk - 1) / kchunk);
    return d;
}

// Programmatic dependent launch (sm_90): the shrink lets the expand start early; the expand runs
// its prologue (grouping, table, B and y loads) and waits here before reading the partials.
// Without the launch attribute both are no-ops.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Signals between blocks of one launch, or of a launch and its programmatic dependent (the fused
// decode kernel's completion count, the pipelined shrink's "u is summed" word): an acquire load
// at GPU scope, and an increment at L2 that wraps, with no value back.
__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// *p = (*p >= wrap) ? 0 : *p + 1 at L2, no value back; `release` orders the block's earlier writes
// (made visible to thread 0 by a barrier) before it.
__device__ __forceinline__ void red_inc(unsigned* p, unsigned wrap, bool release) {
    if (release)
        asm volatile("red.release.gpu.global.inc.u32 [%0], %1;" ::"l"(p), "r"(wrap) : "memory");
    else
        asm volatile("red.relaxed.gpu.global.inc.u32 [%0], %1;" ::"l"(p), "r"(wrap) : "memory");
}

// mma.sync m16n8k16, fp32 accumulate. A: 4 regs (row-major 16x16), B: 2 regs (col-major 16x8).
template <bool BF16>
__device__ __forceinline__ void mma16816(float c[4], const u32 a[4], const u32 b[2]);
template <>
__device__ __forceinline__ void mma16816<true>(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<false>(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
