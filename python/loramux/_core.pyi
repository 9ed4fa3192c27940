"""Type stubs for the Rust extension loramux._core (rust/src/bindings/)."""

from typing import List, Optional, Tuple

import numpy as np

__version__: str

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
def validate(
    raw_weights: np.ndarray,
    dtype: str,
    weights_shape: List[int],
    config: np.ndarray,
    config_shape: List[int],
    spec: ModelSpec,
    dora_allowed: bool = True,
    check_finite: bool = True,
) -> List[Tuple[int, int, int, int, int, bool]]: ...
def pack(
    raw_weights: np.ndarray,
    dtype: str,
    weights_shape: List[int],
    config: np.ndarray,
    config_shape: List[int],
    spec: ModelSpec,
    out_dtype: str,
) -> Tuple[np.ndarray, List[Tuple[int, int, int]]]: ...
def tp_slice_adapter(
    raw_weights: np.ndarray,
    dtype: str,
    weights_shape: List[int],
    config: np.ndarray,
    config_shape: List[int],
    spec: ModelSpec,
    tp_size: int,
    tp_rank: int,
    layers: Optional[Tuple[int, int]] = None,
) -> Tuple[np.ndarray, int, int, List[int], ModelSpec]: ...
def tp_rank_spec(spec: ModelSpec, tp_size: int, layers: Optional[Tuple[int, int]] = None) -> ModelSpec: ...
