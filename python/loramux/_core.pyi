"""Type stubs for the Rust extension loramux._core (rust/src/bindings/). tests/test_core_stub.py
fails when a name or a signature here differs from the compiled module."""

from typing import Dict, List, Optional, Tuple, Union

import numpy as np

__version__: str

#: (flat uint8 weights, dtype name, weights shape, flat int64 config, config shape), as
#: loramux.format.adapter_input builds it
_AdapterInput = Tuple[np.ndarray, str, List[int], np.ndarray, List[int]]
#: (flat uint8 weights, dtype name, weights shape), as loramux.format.raw_weights returns it
_WeightsInput = Tuple[np.ndarray, str, List[int]]

class ModelSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    expert_ffn_size: int
    num_experts: int
    encoder_hidden_size: int
    max_rank: int
    def __init__(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        ffn_size: int = 0,
        expert_ffn_size: int = 0,
        num_experts: int = 0,
        encoder_hidden_size: int = 0,
        max_rank: int = 64,
    ) -> None: ...
    def module_dims(self, module_id: int) -> Tuple[int, int]: ...

def module_table() -> List[Tuple[int, str, str]]: ...
def module_id(name: str) -> int: ...
def module_name(module_id: int) -> Optional[str]: ...
def dtype_table() -> List[Tuple[str, int, bool]]: ...
def validate(
    adapter: _AdapterInput,
    spec: ModelSpec,
    dora_allowed: bool = True,
    check_finite: bool = True,
) -> List[Tuple[int, int, int, int, int, bool]]: ...
# rows: (module_id, layer, rank, hi, ho, is_dora); returns (row, column, value) or None
def first_unstorable(
    weights: _WeightsInput,
    rows: List[Tuple[int, int, int, int, int, bool]],
    storage_type: str,
) -> Optional[Tuple[int, int, float]]: ...
def tp_slice_adapter(
    adapter: _AdapterInput,
    spec: ModelSpec,
    tp_size: int,
    tp_rank: int,
    layers: Optional[Tuple[int, int]] = None,
    served: Optional[List[Tuple[int, int]]] = None,
) -> Tuple[np.ndarray, int, int, List[int], ModelSpec]: ...
def tp_rank_spec(spec: ModelSpec, tp_size: int, layers: Optional[Tuple[int, int]] = None) -> ModelSpec: ...

#: names of the int64 words of one slot-table entry, in order
SLOT_ENTRY_FIELDS: Tuple[str, ...]

class AdapterCache:
    """The two-level adapter cache over caller-owned pool/table tensors (python/loramux/cache.py)."""
    def __init__(
        self,
        spec: ModelSpec,
        dtype: str,
        host_cache_bytes: int,
        pool_addr: int,
        pool_bytes: int,
        table_addr: int,
        max_slots: int,
        page_bytes: int,
        cuda_device: Optional[int] = None,
        copy_stream: int = 0,
        dora_allowed: bool = True,
        served: Optional[List[Tuple[int, int]]] = None,
    ) -> None: ...
    def put(self, task_id: int, adapter: _AdapterInput, replace: bool = False) -> str: ...
    def remove(self, task_id: int) -> None: ...
    def contains(self, task_id: int) -> bool: ...
    def was_removed(self, task_id: int) -> bool: ...
    def __len__(self) -> int: ...
    def task_ids(self) -> List[int]: ...
    def acquire(self, task_ids: List[int], compute_stream: int) -> Tuple[int, List[int]]: ...
    def release(self, batch_id: int, compute_stream: int) -> None: ...
    def prefetch(self, task_ids: List[int]) -> None: ...
    def synchronize(self) -> None: ...
    # stats keys include host_pool_bytes, host_pool_pinned_bytes, host_pool_chunks, host_pool_grows, host_pool_free_runs,
    # host_pool_largest_free_run_bytes, host_fragmentation, host_pool_alloc_seconds, host_compactions
    def stats(self) -> Dict[str, Union[int, float]]: ...
    def slot_of(self, task_id: int) -> Optional[int]: ...
    def resident_ids(self) -> List[int]: ...
    def pinned_ids(self) -> List[int]: ...
    def check_invariants(self) -> Optional[str]: ...
    def host_image(self, task_id: int) -> Optional[Tuple[bytes, List[Tuple[int, int, int, int, int, int]]]]: ...
    @staticmethod
    def table_bytes(max_slots: int, num_layers: int) -> int: ...
    @staticmethod
    def host_pool_bytes(host_cache_bytes: int, page_bytes: int) -> int: ...
    @staticmethod
    def worker_threads() -> int: ...
    @staticmethod
    def cuda_driver_present() -> bool: ...

# --- CUDA LoRA kernels (rust/src/bindings/ops.rs; used by loramux.ops.kernels) ---
KERNEL_MAX_RANK: int
KERNEL_MAX_SLICES: int

class KernelBatch:
    def __init__(
        self,
        *,
        device: int,
        stream: int,
        dtype: str,
        slot_of_token: int,
        segments: int,
        tokens: int,
        table: int,
        num_slots: int,
        num_layers: int,
        layer: int,
        max_rank: int,
        shrink_target_blocks: Optional[int] = None,
        expand_kernel: Optional[str] = None,
        decode_device_split: Optional[bool] = None,
        adapters: Optional[int] = None,
    ) -> None: ...
    def shrink(
        self, x: int, x_stride: int, hi: int, module_ids: List[int], partial: int, partial_capacity: int,
        plan: Tuple[int, int, bool, int],
    ) -> Optional[int]: ...  # u's offset (floats) in `partial` where the pipelined prefill shrink wrote u
    def reduce(self, module_ids: List[int], partial: int, plan: Tuple[int, int, bool, int], u: int) -> None: ...
    def expand(
        self, partial: int, ksplit: int, y: int, y_stride: int, module_ids: List[int], out_sizes: List[int],
        chained: bool = False, hi: int = 0, split_target: int = 0,
    ) -> None: ...
    def apply_signalled(
        self, x: int, x_stride: int, hi: int, y: int, y_stride: int, module_ids: List[int], out_sizes: List[int],
        partial: int, partial_capacity: int, plan: Tuple[int, int, bool, int],
    ) -> bool: ...  # False: nothing launched (shrink, then expand)
    def fused(
        self, x: int, x_stride: int, hi: int, y: int, y_stride: int, module_ids: List[int], out_sizes: List[int],
        partial: int, partial_capacity: int, plan: Tuple[int, int, int, int, bool, Optional[int], int, int],
    ) -> None: ...
    def merge_beside(
        self, applies: List[Tuple[List[int], List[int]]], width: int, y: int, y_stride: int, delta: int, delta_stride: int,
    ) -> None: ...  # y = (the row's DoRA scales over the slices) * y + delta

# (ksplit, kchunk, reduce_first, split_target): split_target > 0 sizes a decode split on the device
def plan_shrink(tokens: int, hi: int, num_slices: int, num_slots: int, shrink_target_blocks: Optional[int] = None,
                expand_kernel: Optional[str] = None, max_rank: int = 16,
                device_split: bool = True, decode_device_split: Optional[bool] = None,
                adapters: Optional[int] = None) -> Tuple[int, int, bool, int]: ...
def plan_fused(tokens: int, hi: int, max_out: int, num_slices: int, num_slots: int, max_rank: int,
               shrink_target_blocks: Optional[int] = None, expand_kernel: Optional[str] = None,
               decode_device_split: Optional[bool] = None,
               adapters: Optional[int] = None) -> Optional[Tuple[int, int, int, int, bool, Optional[int], int, int]]: ...
def segments_len(tokens: int, num_slots: int, adapters: Optional[int] = None) -> int: ...
def small_items(tokens: int, adapters: Optional[int] = None) -> bool: ...
def build_segments(device: int, stream: int, slot_of_token: int, tokens: int, num_slots: int, segments: int,
                   capacity: int, adapters: Optional[int] = None) -> None: ...
def nvrtc_available() -> bool: ...
def nvrtc_version() -> Tuple[int, int]: ...
def nvrtc_compile_all(arch: int, cache: bool = False) -> List[Tuple[str, int]]: ...
def nvrtc_cache_dir() -> Optional[str]: ...
def kernel_families() -> List[Tuple[str, List[str]]]: ...
def load_kernels(device: int) -> int: ...
def kernel_struct_layouts() -> List[Tuple[str, int, int, List[Tuple[str, int]]]]: ...
def kernel_constants() -> List[Tuple[str, int]]: ...
