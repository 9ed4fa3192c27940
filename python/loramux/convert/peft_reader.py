"""Reads a PEFT LoRA adapter directory into the TensorRT-LLM (weights, config) numpy format.

from_peft folds the LoRA scale (alpha/r, or alpha/sqrt(r) with rsLoRA) into B, maps HF module paths
to module ids through loramux.convert.hf_modules, and normalizes DoRA magnitudes against the base weights.
Whatever the format cannot hold raises LoraConvertError naming it; nothing is dropped silently.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import loramux.format as fmt
from loramux.convert import hf_modules as hfspec
from loramux.convert.peft_files import ADAPTER_CONFIG, BIN_FILE, EXPERT_PARAM_ORDER, KEY_PREFIX, SAFETENSORS_FILE
from loramux.dora import BaseWeights, normalize
from loramux.errors import LoraConvertError, LoraDoraError, LoraFormatError
from loramux.format import AdapterRow
from loramux.modules import MODULE_NAMES

# Adapters bigger than this (bytes in the output) get a progress bar by default.
PROGRESS_BYTES = 64 << 20
# adapter_config fields that turn LoRA into something the format cannot express.
_UNSUPPORTED_FIELDS = ("layer_replication", "trainable_token_indices", "velora_config", "kasa_config", "arrow_config",
                       "alora_invocation_tokens", "use_qalora", "use_bdlora", "lora_bias", "megatron_config")
# init_lora_weights values (prefixes, as PEFT matches them) whose initialization rewrites the base
# weights (W - B0 A0 for PiSSA, OLoRA and CorDA; a quantized residual for LoftQ). PEFT runs it again
# when it loads such an adapter, so the adapter only means something over that rewritten base, never
# over the unchanged base loramux shares between adapters.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _pattern_get(pattern: Dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a pattern matches a key's trailing path."""
    for p in pattern:
        if re.match(rf"(.*\.)?({p})$", key):
            return pattern[p]
    return default


def read_adapter(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(adapter_config dict, state dict of torch tensors) of a PEFT adapter directory; safetensors
    preferred, adapter_model.bin only through torch.load(weights_only=True)."""
    import torch

    if not os.path.isdir(path):
        raise LoraConvertError(f"{path}: no such folder (a PEFT adapter folder holds {ADAPTER_CONFIG} and its weights)")
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise LoraConvertError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    config = fmt.read_json(cfg_path, LoraConvertError)
    if not isinstance(config, dict):
        raise LoraConvertError(f"{cfg_path}: holds {_json_type(config)}, expected a JSON object (PEFT's LoraConfig fields)")
    st, binf = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, BIN_FILE)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        try:
            state = load_file(st)
        except Exception as e:  # safetensors validates its header against the file size
            raise LoraFormatError(f"{st}: unreadable safetensors file ({e})") from None
    elif os.path.isfile(binf):
        try:
            state = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LoraFormatError(f"{binf}: not loadable with torch.load(weights_only=True) ({e})") from None
    else:
        raise LoraConvertError(f"{path}: neither {SAFETENSORS_FILE} nor {BIN_FILE}")
    return config, state


def _json_type(value: Any) -> str:
    """How JSON spells a parsed value's type, for messages about adapter_config.json."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_field_types(config: Dict[str, Any]) -> None:
    """The fields from_peft computes with must have PEFT's types: a string "16" or a null lora_alpha
    would otherwise end in a TypeError deep in the scaling, a bad regex in re.error."""
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise LoraConvertError(f"lora_alpha={config['lora_alpha']!r} ({_json_type(config['lora_alpha'])}): must be a finite number")
    if "r" in config and not _is_rank(config["r"]):
        raise LoraConvertError(f"r={config['r']!r} ({_json_type(config['r'])}): must be an integer >= 1")
    for name, ok, want in (("alpha_pattern", _is_number, "a finite number"), ("rank_pattern", _is_rank, "an integer >= 1")):
        pattern = config.get(name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise LoraConvertError(f"{name}={pattern!r}: must be an object mapping module-name patterns to values, "
                                   f"not {_json_type(pattern)}")
        for key, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise LoraConvertError(f"{name} key {key!r}: not a valid regular expression ({e})") from None
            if not ok(value):
                raise LoraConvertError(f"{name}[{key!r}]={value!r} ({_json_type(value)}): must be {want}")
    for name in ("use_dora", "use_rslora"):
        if config.get(name) not in (None, True, False):
            raise LoraConvertError(f"{name}={config[name]!r} ({_json_type(config[name])}): must be true or false")
    auto = config.get("auto_mapping")
    if auto is not None and not (isinstance(auto, dict) and isinstance(auto.get("base_model_class", ""), (str, type(None)))):
        raise LoraConvertError(f"auto_mapping={auto!r}: must be an object whose base_model_class is a class name string")
    params = config.get("target_parameters")
    if params is not None and not (isinstance(params, list) and all(isinstance(t, str) for t in params)):
        raise LoraConvertError(f"target_parameters={params!r}: must be a list of parameter names")


def _check_config(config: Dict[str, Any]) -> None:
    _check_field_types(config)
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraConvertError(f"peft_type {config.get('peft_type')!r}: only LORA adapters can be converted")
    if config.get("modules_to_save"):
        raise LoraConvertError(f"modules_to_save {config['modules_to_save']}: fully trained modules cannot be held by the LoRA format")
    if config.get("bias", "none") != "none":
        raise LoraConvertError(f"bias={config['bias']!r}: trained biases cannot be held by the LoRA format")
    for name in _UNSUPPORTED_FIELDS:
        if config.get(name):
            raise LoraConvertError(f"{name}={config[name]!r}: not expressible in the LoRA format")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        fix = ("serve the base model LoftQ saved, with the adapter saved as init_lora_weights=true"
               if init.lower() == "loftq" else
               "save it as a plain LoRA first with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)")
        raise LoraConvertError(f"init_lora_weights={init!r}: this initialization rewrites the base weights, and PEFT "
                               "rewrites them again when it loads the adapter, so over the unchanged base model the "
                               f"adapter gives other outputs; {fix}")


def _group_factors(state: Dict[str, Any]) -> Dict[str, Dict[str, np.ndarray]]:
    """raw module path -> {'A', 'B', 'm'} as float32 numpy; any other key is an error naming it."""
    groups: Dict[str, Dict[str, np.ndarray]] = defaultdict(dict)
    suffixes = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector.weight", "m"),
                (".lora_magnitude_vector", "m"))
    for key, tensor in state.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        for suffix, part in suffixes:
            if name.endswith(suffix):
                values = tensor.detach().float().cpu().numpy()
                if not np.isfinite(values).all():  # the format refuses NaN/Inf; say which tensor holds one
                    bad = values[~np.isfinite(values)].reshape(-1)[0]
                    raise LoraFormatError(f"{key}: holds a non-finite value ({bad}); the format needs finite weights")
                groups[name[: -len(suffix)]][part] = values
                break
        else:
            if "lora_embedding" in name:
                raise LoraConvertError(f"{key}: embedding LoRA cannot be held by the LoRA format")
            if name.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers
                raise LoraConvertError(f"{key}: the base weight PEFT saves beside a LoRA on an embedding or lm_head; "
                                       "the LoRA format holds LoRA on the projections inside transformer layers only")
            raise LoraConvertError(f"{key}: not a LoRA factor (modules_to_save, a bias or trainable tokens?); "
                                   "the LoRA format cannot hold it")
    for path, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            raise LoraConvertError(f"{path}: has {sorted(parts)} but needs both lora_A and lora_B")
    return groups


def detect_arch(config: Dict[str, Any], paths: Sequence[str], base: Optional[BaseWeights] = None) -> str:
    """HF model_type of the adapter's base: from the base model, adapter_config's auto_mapping, or the
    module names."""
    if base is not None and base.config and base.config.get("model_type"):
        return base.config["model_type"]
    cls = (config.get("auto_mapping") or {}).get("base_model_class")
    if cls and hfspec.arch_from_class_name(cls):
        return hfspec.arch_from_class_name(cls)
    joined = "\n".join(paths)
    for needle, arch in ((r"encoder_attn|model\.(de|en)coder\.", "bart"), (r"\.c_attn|\.c_fc|transformer\.h\.", "gpt2"),
                         (r"qkv_proj|mlp\.gate_up_proj", "phi3"), (r"shared_expert|experts\.\d+\.gate_proj", "qwen2_moe"),
                         (r"block_sparse_moe|mlp\.experts|mlp\.gate(\n|$|\.)", "mixtral")):
        if re.search(needle, joined):
            return arch
    return "llama"


def _expert_params(logical: str, raws: List[str], target_parameters: Sequence[str]) -> Dict[str, str]:
    """raw path -> parameter name, for ParamWrappers nested on one experts module."""
    names = [t.rsplit(".", 1)[1] for t in target_parameters
             if (logical + "." + t.rsplit(".", 1)[1]).endswith(t) or f"{logical}.{t.rsplit('.', 1)[1]}" == t]
    names = [n for n in EXPERT_PARAM_ORDER if n in names]
    if len(names) != len(raws):
        raise LoraConvertError(f"{logical}: {len(raws)} LoRA wrappers but target_parameters names {names}")
    # innermost wrapper (most ".base_layer") is the first registered parameter
    by_depth = sorted(raws, key=lambda r: -r.count(".base_layer"))
    return dict(zip(by_depth, names))


def _resolve_targets(groups, arch: str, target_parameters: Sequence[str], encoder_layers: Optional[int]):
    """[(hf key for rank/alpha patterns, HfTarget, factors)] for every LoRA group."""
    by_logical: Dict[str, List[str]] = defaultdict(list)
    for raw in groups:
        by_logical[raw.replace(".base_layer", "")].append(raw)
    out = []
    for logical, raws in sorted(by_logical.items()):
        if logical.endswith(".experts"):
            for raw, pname in _expert_params(logical, raws, target_parameters).items():
                key = f"{logical}.{pname}"
                out.append((key, hfspec.target_for(arch, key, encoder_layers), groups[raw]))
            continue
        if len(raws) != 1:
            raise LoraConvertError(f"{logical}: {len(raws)} nested LoRA wrappers; only experts modules may have several")
        target = hfspec.target_for(arch, logical, encoder_layers)
        as_param = target.kind == hfspec.ROUTER and any(t.endswith("gate.weight") for t in target_parameters)
        out.append((logical + ".weight" if as_param else logical, target, groups[raws[0]]))
    return out


def _scaling(config: Dict[str, Any], key: str, rank: int) -> float:
    alpha = _pattern_get(config.get("alpha_pattern") or {}, key, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _same_for_all_experts(a: np.ndarray, b: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """a [E, r, in], b [E, out, r] -> expert 0's (A, B) if every expert has the same ones."""
    for e in range(1, a.shape[0]):
        if not (np.array_equal(a[e], a[0]) and np.array_equal(b[e], b[0])):
            raise LoraConvertError(f"{what}: experts 0 and {e} have different LoRA weights; the format has one row per "
                                   "module-layer, so all experts of a layer must share one adapter")
    return a[0], b[0]


def _check_model_shapes(key, target, a: np.ndarray, b: np.ndarray, spec: fmt.ModelSpec) -> None:
    """lora_A / lora_B against the widths of the model's layer: a factor of the wrong width would
    still fit a padded row and serve garbage (the validator sees only the row's length)."""
    try:
        hi = spec.module_dims(target.module_id)[0]
        ho = sum(spec.module_dims(m)[1] for m in target.module_ids)
    except ValueError:
        return  # a module this model lacks: fmt.validate names it
    cols = a.shape[0]  # rank (rank * experts for a fused experts parameter)
    for name, got, want in (("lora_A", a.shape, (cols, hi)), ("lora_B", b.shape, (ho, cols))):
        if tuple(got) != want:
            ids = "+".join(MODULE_NAMES[m] for m in target.module_ids)
            raise LoraConvertError(f"{key}: {name} has shape {list(got)}, expected {list(want)} for this model's {ids} "
                                   f"(input width {hi}, output width {ho})")


def _rows_for_target(key, target, factors, config, base: Optional[BaseWeights], spec: Optional[fmt.ModelSpec]):
    """AdapterRows for one HF target (two for a fused gate_up experts parameter)."""
    a, b, m = factors["A"], factors["B"], factors.get("m")
    num_experts = spec.num_experts if spec is not None else None
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise LoraConvertError(f"{key}: lora_A {a.shape} and lora_B {b.shape} are not [rank, in] and [out, rank]")
    if a.shape[0] == 0:  # alpha / r would divide by zero; the format's ranks start at 1
        raise LoraConvertError(f"{key}: its rank is 0 (lora_A {list(a.shape)}, lora_B {list(b.shape)}); the format needs rank >= 1")
    if spec is not None:
        _check_model_shapes(key, target, a, b, spec)
    if target.kind == hfspec.EXPERTS:
        r = _pattern_get(config.get("rank_pattern") or {}, key, config.get("r", 8))
        if a.shape[0] % r or b.shape[1] != a.shape[0]:
            raise LoraConvertError(f"{key}: lora_A {a.shape} / lora_B {b.shape} are not [rank*experts, in] / [out, rank*experts] for r={r}")
        e = a.shape[0] // r
        if num_experts is not None and e != num_experts:
            raise LoraConvertError(f"{key}: LoRA covers {e} experts, the model has {num_experts}")
        a, b = _same_for_all_experts(a.reshape(e, r, -1), b.reshape(b.shape[0], r, e).transpose(2, 0, 1), key)
    scaled_b = b * np.float32(_scaling(config, key, a.shape[0]))
    scale = None
    if m is not None:
        if base is None:
            raise LoraDoraError(f"{key}: a DoRA adapter (use_dora) needs the base model's weights to normalize its "
                                "magnitudes: pass base_model= (an HF model or a saved model dir; CLI --base-model DIR)")
        w0 = base.weight(key, transposed=target.kind == hfspec.CONV1D)
        scale = normalize(w0, a, scaled_b, m.reshape(-1)).astype(np.float32)
    if len(target.module_ids) == 1:
        return [AdapterRow(target.module_id, target.layer, a, scaled_b, scale)]
    if b.shape[0] % len(target.module_ids):
        raise LoraConvertError(f"{key}: cannot split a fused output of {b.shape[0]} into {len(target.module_ids)} modules")
    parts = np.split(scaled_b, len(target.module_ids), axis=0)
    # a DoRA scale belongs to one output row (its norm is that row's), so it splits with B's rows
    scales = np.split(scale, len(target.module_ids)) if scale is not None else [None] * len(parts)
    return [AdapterRow(mid, target.layer, a, part, part_scale)
            for mid, part, part_scale in zip(target.module_ids, parts, scales)]


def _storage_error(key: str, fault: fmt.StorageFault) -> LoraConvertError:
    """A value of `key`'s rows that the storage type cannot hold (fmt.storage_fault), named by the
    key: lora_B carries lora_alpha/r, which is where such a value usually comes from."""
    if fault.factor == "lora_B":
        fault = fault._replace(factor="lora_B (scaled by lora_alpha/r)")
    hint = "; lora_alpha too large, or a DoRA norm of 0?" if not fault.finite else ""
    return LoraConvertError(f"{key}: {fault.detail()}{hint}")


# Which width each module's input / output shares with other modules (module_dims in
# rust/src/format.rs): (width name, multiple); None for a sum (a fused qkv output), checked per module.
_SHARED_WIDTHS = {
    "attn_qkv": (("hidden size", 1), None),
    "attn_q": (("hidden size", 1), ("attention width", 1)),
    "attn_k": (("hidden size", 1), ("key/value width", 1)),
    "attn_v": (("hidden size", 1), ("key/value width", 1)),
    "attn_dense": (("attention width", 1), ("hidden size", 1)),
    "mlp_h_to_4h": (("hidden size", 1), ("MLP width", 1)),
    "mlp_gate": (("hidden size", 1), ("MLP width", 1)),
    "mlp_4h_to_h": (("MLP width", 1), ("hidden size", 1)),
    "mlp_gate_up": (("hidden size", 1), ("MLP width", 2)),
    "cross_attn_qkv": (("hidden size", 1), None),
    "cross_attn_q": (("hidden size", 1), ("attention width", 1)),
    "cross_attn_k": (("encoder width", 1), ("key/value width", 1)),
    "cross_attn_v": (("encoder width", 1), ("key/value width", 1)),
    "cross_attn_dense": (("attention width", 1), ("hidden size", 1)),
    "moe_h_to_4h": (("hidden size", 1), ("expert MLP width", 1)),
    "moe_gate": (("hidden size", 1), ("expert MLP width", 1)),
    "moe_4h_to_h": (("expert MLP width", 1), ("hidden size", 1)),
    "moe_router": (("hidden size", 1), ("number of experts", 1)),
    "mlp_router": (("hidden size", 1), ("mlp_router output width (1)", 1)),
}
# widths the format fixes, whatever the factors say
_FIXED_WIDTHS = {"mlp_router output width (1)": 1}


class _Widths:
    """Checks, without the model, what the factors' shapes say about it: each module kind has one
    width in every layer, and modules that share a width (q, k, v and gate/up all read the hidden
    size; o_proj reads what q_proj writes, ...) agree. The width most factors give is taken as the
    model's, so the odd factor out is the one named. The model's config checks the rest."""

    def __init__(self) -> None:
        # width name -> [(width, key, factor, shape, rank, side, times, module name)]
        self.seen: Dict[str, List[Tuple[int, str, str, Tuple[int, ...], int, int, int, str]]] = defaultdict(list)

    def add(self, key: str, row: AdapterRow) -> None:
        name = MODULE_NAMES[row.module_id]
        rank = row.a.shape[0]
        for factor, side, shape, width, entry in (("lora_A", 1, row.a.shape, row.a.shape[1], _SHARED_WIDTHS[name][0]),
                                                  ("lora_B", 0, row.b.shape, row.b.shape[0], _SHARED_WIDTHS[name][1])):
            what, times = entry or (f"{name} {'input' if side else 'output'} width", 1)
            if width % times:
                raise LoraConvertError(f"{key}: {factor} has shape {list(shape)}: its {name} width {width} is not "
                                       f"{times} x the {what}")
            self.seen[what].append((width // times, key, factor, tuple(shape), rank, side, times, name))

    def check(self) -> None:
        for what, seen in self.seen.items():
            want = _FIXED_WIDTHS.get(what) or Counter(s[0] for s in seen).most_common(1)[0][0]
            agree = next((s for s in seen if s[0] == want), None)
            for width, key, factor, shape, rank, side, times, _ in seen:
                if width != want:
                    expected = [rank, want * times] if side else [want * times, rank]
                    source = f" as {agree[1]} {agree[2]} {list(agree[3])} gives" if agree else ""
                    sharing = ", ".join(sorted({s[7] for s in seen}))
                    raise LoraConvertError(f"{key}: {factor} has shape {list(shape)}, expected {expected}: the {what} "
                                           f"is {want}{source} ({sharing} of every layer must agree on it)")


def _merge_per_expert(items):
    """transformers-4 per-expert Linear LoRA -> one row per (module, layer) if all experts share it."""
    rows, seen = [], defaultdict(dict)
    for key, target, row in items:
        seen[(target.module_id, target.layer)][target.expert] = (key, row)
    for (mid, layer), experts in sorted(seen.items()):
        if sorted(experts) != list(range(len(experts))):
            raise LoraConvertError(f"layer {layer} {MODULE_NAMES[mid]}: LoRA on experts {sorted(experts)} only; "
                                   "the format needs one adapter shared by all experts")
        a = np.stack([r.a for _, r in experts.values()])
        b = np.stack([r.b for _, r in experts.values()])
        _same_for_all_experts(a, b, f"layer {layer} {MODULE_NAMES[mid]}")
        rows.append(experts[0][1])
    return rows


def from_peft(path: str, storage_type: str = "float16", base_model: Any = None, *, arch: Optional[str] = None,
              max_rank: int = 64, progress: Optional[bool] = None,
              max_bytes: int = fmt.DEFAULT_MAX_FILE_BYTES) -> Tuple[np.ndarray, np.ndarray]:
    """Converts a PEFT LoRA adapter directory to (weights [N, W], config [N, 3|4]) numpy arrays.

    base_model (an HF model or a saved model directory) is required for DoRA adapters and for the
    decoder of an encoder-decoder (its layers are numbered after the encoder's); when given, the
    result is validated against its ModelSpec."""
    config, state = read_adapter(path)
    _check_config(config)
    base = BaseWeights(base_model) if base_model is not None else None
    groups = _group_factors(state)
    if not groups:  # an empty [0, 0] adapter is valid for no model and changes nothing: a wrong folder?
        raise LoraConvertError(f"{path}: no LoRA factors found (the adapter's state dict is empty)")
    if config.get("use_dora"):
        missing = sorted(p for p, parts in groups.items() if "m" not in parts)
        if missing:  # converted as plain LoRA it would serve another adapter than the one trained
            more = f" (and {len(missing) - 1} more modules)" if len(missing) > 1 else ""
            raise LoraConvertError(f"{path}: use_dora is true but {missing[0]}{more} has no lora_magnitude_vector: "
                                   "a DoRA adapter without its magnitudes cannot be converted")
    arch = arch or detect_arch(config, list(groups), base)
    base_config = base.config if base is not None else None
    targets = _resolve_targets(groups, arch, config.get("target_parameters") or [], hfspec.encoder_layers_of(base_config))
    spec = hfspec.spec_from_hf_config(base_config, max_rank) if base_config else None
    out_bytes = sum(f["A"].size + f["B"].size for _, _, f in targets) * (4 if storage_type == "float32" else 2)
    if out_bytes > max_bytes:
        raise LoraFormatError(f"{path}: converted adapter would take {out_bytes} bytes, over the limit of {max_bytes}")
    from tqdm import tqdm

    show = progress if progress is not None else out_bytes > PROGRESS_BYTES
    # with the model each factor is checked against its layer's widths (_check_model_shapes)
    rows, per_expert, widths = [], [], _Widths() if spec is None else None
    for key, target, factors in tqdm(targets, desc="converting", unit="module", disable=not show):
        new = _rows_for_target(key, target, factors, config, base, spec)
        fault = fmt.storage_fault(new, storage_type)
        if fault is not None:
            raise _storage_error(key, fault)
        if widths is not None:
            for row in new:
                widths.add(key, row)
        if target.kind == hfspec.PER_EXPERT:
            per_expert += [(key, target, r) for r in new]
        else:
            rows += new
    if widths is not None:
        widths.check()
    rows = sorted(rows + _merge_per_expert(per_expert), key=lambda r: (r.layer, r.module_id))
    weights, cfg = fmt.from_rows(rows, storage_type)
    if spec is not None:
        fmt.validate(weights, cfg, spec)
    return weights, cfg


__all__ = ["from_peft", "read_adapter", "detect_arch"]
