"""The 19 module ids against the contract's table (seed-lora-format.md, "LoRA Module id mapping"),
spelled out here rather than read from the code, so a renamed or renumbered module fails."""

import pytest

from loramux import modules
from loramux.errors import LoraFormatError

CONTRACT_TABLE = {
    "attn_qkv": 0, "attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4, "mlp_h_to_4h": 5, "mlp_4h_to_h": 6,
    "mlp_gate": 7, "cross_attn_qkv": 8, "cross_attn_q": 9, "cross_attn_k": 10, "cross_attn_v": 11,
    "cross_attn_dense": 12, "moe_h_to_4h": 13, "moe_4h_to_h": 14, "moe_gate": 15, "moe_router": 16,
    "mlp_router": 17, "mlp_gate_up": 18,
}
#: RowLinear layers split their input (A) under tensor parallelism: the down projections
ROW_LINEAR = {"attn_dense", "mlp_4h_to_h", "cross_attn_dense", "moe_4h_to_h"}


def test_module_ids_and_names_are_the_contracts():
    assert modules.NUM_MODULES == 19
    assert modules.MODULE_IDS == CONTRACT_TABLE
    assert modules.MODULE_NAMES == {mid: name for name, mid in CONTRACT_TABLE.items()}
    assert modules.module_names() == sorted(CONTRACT_TABLE, key=CONTRACT_TABLE.get)
    for name, mid in CONTRACT_TABLE.items():
        assert modules.module_id(name) == mid


def test_row_and_column_linear_modules():
    assert modules.ROW_PARALLEL == {CONTRACT_TABLE[n] for n in ROW_LINEAR}
    assert modules.COLUMN_PARALLEL == set(range(19)) - modules.ROW_PARALLEL


@pytest.mark.parametrize("name", ["attn_x", "", "ATTN_Q", "q_proj"])
def test_an_unknown_module_name_is_a_format_error_naming_it(name):
    with pytest.raises(LoraFormatError, match=repr(name).replace("'", '"')):
        modules.module_id(name)
