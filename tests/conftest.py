"""What every test module shares: the `gpu` mark skips its tests where torch sees no CUDA device
(so a GPU test is written once, `@pytest.mark.gpu`, and `pytest -m gpu` selects them all), and the
fixtures several modules use. Helper modules (peft_models, dora_adapters, tiny_hf, tp_oracle,
cache_helpers, kernel_fixtures) sit beside the tests and are imported by name."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def dora_setup(tmp_path_factory):
    """(base model, PeftModel with two DoRA adapters and a plain one, {name: (weights, config)},
    the folder PEFT saved them in); built once per module that asks for it."""
    from dora_adapters import build_dora_setup

    return build_dora_setup(tmp_path_factory.mktemp("peft"))
