"""Quantized checkpoints: save a W4A4-quantized model once, load it later without
the original weights and without re-quantizing.

A checkpoint is a directory holding
  - `model.safetensors`: the model's whole state dict (W4A4Linear buffers and
    every remaining float parameter and buffer: an offline rotation changes the
    embeddings, norms and LM head too), one copy per tied group of tensors;
  - `apex4_config.json`: what is needed to rebuild the model skeleton (the
    transformers class and config), the quantized layers and their shapes, the
    float layers with an online input rotation (`RotatedInputLinear`, left by
    `rotate_` where quantize_'s filter skipped a layer), the tied weights,
    the file's size and sha256, and the quantization metadata passed to
    `save_quantized`: the granularity plan (`GranularityPlan.to_dict()`, with
    its per-layer sensitivity) and the rotation.

    save_quantized(model, "ckpt", base_model="SmolLM2-135M-Instruct")
    model = load_quantized("ckpt")
    model.apex4_checkpoint["plan"]        # a GranularityPlan, or None

Command line:
    python -m torch_apex4.checkpoint quantize [--model PATH_OR_GGUF] --group-size 128 [--plan PLAN.json] --out DIR
    python -m torch_apex4.checkpoint info DIR
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .ops import num_groups, padded_k
from .plan import GranularityPlan, granularity_label, same_layout
from .quantize import W4A4Config, W4A4Linear, fuse_projections_, quantize_
from .rotation import RotatedInputLinear

FORMAT = "torch_apex4"
FORMAT_VERSION = 1
CONFIG_FILE = "apex4_config.json"
WEIGHTS_FILE = "model.safetensors"
# Exposed on the loaded model as `model.apex4_checkpoint`.
METADATA_KEYS = ("base_model", "plan", "rotation")
REQUIRED_FIELDS = ("model_class", "hf_config", "hf_generation_config", "layers", "rotated_float_layers",
                   "tied_weights", "weights", *METADATA_KEYS)


# ----------------------------------------------------------------------------- saving

def save_quantized(model: nn.Module, directory, *, base_model: str,
                   plan: GranularityPlan | None = None, rotation: dict | None = None) -> Path:
    """Write `model` (already quantized, e.g. by `quantize_`) to `directory`,
    created if needed; files already there are replaced. `plan`: the
    GranularityPlan the model was quantized with (each layer it names must be a
    quantized layer at that granularity); `rotation`: JSON-serializable (what
    rotate_ returns). Both come back in `load_quantized(...).apex4_checkpoint`.
    Returns the directory."""
    directory = Path(directory)
    layers = {name: _layer_entry(m) for name, m in model.named_modules() if isinstance(m, W4A4Linear)}
    _check_plan(plan, layers)
    _check_json_serializable("rotation", rotation)
    tensors, tied = _deduplicated_state_dict(model.state_dict())

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # Until the new config is written, the directory must not pass for a checkpoint.
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    weights_path = directory / WEIGHTS_FILE
    save_file(tensors, weights_path, metadata={"format": "pt"})
    hf_config = getattr(model, "config", None)
    generation_config = getattr(model, "generation_config", None)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "model_class": type(model).__name__,
        "hf_config": hf_config.to_dict() if hf_config is not None else None,
        # Sampling defaults of a model folder's generation_config.json live apart from hf_config.
        "hf_generation_config": generation_config.to_dict() if generation_config is not None else None,
        "layers": layers,
        "rotated_float_layers": [name for name, m in model.named_modules()
                                 if isinstance(m, RotatedInputLinear)],
        "tied_weights": tied,
        "weights": {"file": WEIGHTS_FILE, "bytes": weights_path.stat().st_size,
                    "sha256": _sha256(weights_path)},
        "plan": None if plan is None else plan.to_dict(),
        "rotation": rotation,
    }
    # Written last: a directory with a config has complete weights.
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return directory


def _check_plan(plan, layers: dict):
    if plan is None:
        return
    if not isinstance(plan, GranularityPlan):
        raise TypeError(f"save_quantized: plan must be a GranularityPlan, got {type(plan).__name__}")
    for name, granularity in plan.layers.items():
        if name not in layers:
            raise ValueError(f"save_quantized: the plan names {name}, which is not a quantized layer "
                             "of the model")
        if not same_layout(layers[name]["in_features"], layers[name]["group_size"], granularity):
            raise ValueError(f"save_quantized: the plan gives {name} {granularity_label(granularity)}, "
                             f"but the layer is {granularity_label(layers[name]['group_size'])}")


def _check_json_serializable(key, value):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"save_quantized: {key} must be JSON-serializable: {error}") from None


def _layer_entry(layer: W4A4Linear) -> dict:
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "group_size": layer.group_size,
        "act_clip": layer.act_clip,
        "bias": layer.bias is not None,
        "act_rotation": layer.rotation is not None,
    }


def _deduplicated_state_dict(state: dict) -> tuple[dict, dict]:
    """safetensors refuses tensors that share memory. A tensor that is exactly
    an earlier one (tied weights, e.g. LM head = embeddings) is stored once and
    recorded as {alias: stored name}; one that only overlaps another's memory,
    or is a view of a larger storage, is copied. Empty tensors all have data
    pointer 0, so they are never ties."""
    tensors, tied, first_name_of_view, seen_storages = {}, {}, {}, set()
    for name, tensor in state.items():
        storage = tensor.untyped_storage()
        view = (tensor.device, storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype)
        if tensor.numel() and view in first_name_of_view:
            tied[name] = first_name_of_view[view]
            continue
        first_name_of_view[view] = name
        storage_key = (tensor.device, storage.data_ptr())
        owns_storage = storage_key not in seen_storages and storage.nbytes() == tensor.nbytes
        seen_storages.add(storage_key)
        tensors[name] = (tensor if owns_storage and tensor.is_contiguous()
                         else tensor.clone(memory_format=torch.contiguous_format))
    return tensors, tied


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- loading

def read_checkpoint_config(directory) -> dict:
    """The checkpoint's apex4_config.json, checked to be ours and of a version
    this code reads. Raises ValueError naming the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: {directory} is not a torch_apex4 checkpoint")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a torch_apex4 checkpoint config (no \"format\": \"{FORMAT}\")")
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this "
                         "torch_apex4 reads: upgrade torch_apex4")
    missing = [key for key in REQUIRED_FIELDS if key not in config]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}")
    return config


def load_quantized(directory, device="cpu") -> nn.Module:
    """Rebuild the quantized model saved in `directory` on `device`, in eval
    mode, from the checkpoint alone (no base weights, no re-quantization).
    The metadata given to `save_quantized` is returned as the dict attribute
    `model.apex4_checkpoint` with keys base_model, plan (a GranularityPlan or
    None) and rotation.
    Raises ValueError when the directory is not a valid checkpoint: missing
    files, unknown format or newer version, checksum mismatch, unreadable
    weights, or weights that disagree with the config."""
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    weights = _read_weights(directory, config["weights"], device)
    model = _build_skeleton(config)
    _install_quantized_layers(model, config["layers"], weights)
    _install_rotated_float_layers(model, config["rotated_float_layers"], weights)
    tied = config["tied_weights"]
    _check_state_dict_matches(model, weights, tied)
    model.load_state_dict({**weights, **{alias: weights[name] for alias, name in tied.items()}},
                          strict=True, assign=True)
    _retie(model, tied)
    model.to(device).eval()
    fuse_projections_(model)
    model.apex4_checkpoint = {key: config[key] for key in METADATA_KEYS}
    if config["plan"] is not None:
        model.apex4_checkpoint["plan"] = _stored_plan(config["plan"], config["layers"])
    return model


def _read_weights(directory: Path, recorded: dict, device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / recorded["file"]
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    size = path.stat().st_size
    if size != recorded["bytes"]:
        raise ValueError(f"{path} is {size} bytes but the checkpoint recorded {recorded['bytes']}: "
                         "the file is truncated or was replaced")
    if _sha256(path) != recorded["sha256"]:
        raise ValueError(f"{path} fails its sha256 checksum: the file is corrupted or was replaced")
    try:
        return load_file(path, device=str(device))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def _stored_plan(stored: dict, layers: dict) -> GranularityPlan:
    plan = GranularityPlan.from_dict(stored)  # ValueError naming the problem
    for name, granularity in plan.layers.items():
        if name not in layers or not same_layout(layers[name]["in_features"],
                                                 layers[name]["group_size"], granularity):
            raise ValueError(f"the checkpoint's plan gives {name} {granularity_label(granularity)}, "
                             "which disagrees with its layers")
    return plan


def _build_skeleton(config: dict) -> nn.Module:
    """The model with the saved config and no weights: parameters on the meta
    device (no memory, no random init), buffers real. The non-persistent
    buffers (RoPE frequencies) are not in the state dict, so they must be
    computed by the model's own constructor."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if config["hf_config"] is None:
        raise ValueError(f"the checkpoint of a {config['model_class']} has no hf_config: "
                         "only transformers models can be rebuilt")
    hf_config = AutoConfig.for_model(**config["hf_config"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    if type(model).__name__ != config["model_class"]:
        raise ValueError(f"the checkpoint holds a {config['model_class']}, but its hf_config builds a "
                         f"{type(model).__name__}")
    if config["hf_generation_config"] is not None:
        model.generation_config = GenerationConfig.from_dict(config["hf_generation_config"])
    return model


def _install_quantized_layers(model: nn.Module, layers: dict, weights: dict):
    """Replace each listed nn.Linear by a W4A4Linear with meta buffers of the
    shapes its config entry implies; loading then fills them."""
    for name, entry in layers.items():
        linear = _linear_to_replace(model, name)
        _check_layer_entry(name, entry, linear)
        k, n, group_size = entry["in_features"], entry["out_features"], entry["group_size"]
        rotation = _stored_rotation_on_meta(weights, name) if entry["act_rotation"] else None
        layer = W4A4Linear(_meta(n, padded_k(k, group_size) // 2, dtype=torch.uint8),
                           _meta(n, num_groups(k, group_size), dtype=torch.float32),
                           _meta(n, dtype=linear.weight.dtype) if entry["bias"] else None,
                           k, entry["act_clip"], rotation)
        _replace(model, name, layer)


def _install_rotated_float_layers(model: nn.Module, names: list, weights: dict):
    for name in names:
        linear = _linear_to_replace(model, name)
        layer = RotatedInputLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                   device="meta", dtype=linear.weight.dtype)
        layer.rotation = _stored_rotation_on_meta(weights, name)
        _replace(model, name, layer)


def _stored_rotation_on_meta(weights: dict, layer_name: str) -> torch.Tensor:
    """The rotation factor's shape is the stored tensor's: the config records
    only that the layer has one, and the factor size is rotation.py's choice."""
    rotation = weights.get(f"{layer_name}.rotation")
    if rotation is None:
        raise ValueError(f"layer {layer_name} has an online rotation in the config but not in the "
                         "weights file")
    return torch.empty_like(rotation, device="meta")


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _replace(model: nn.Module, name: str, layer: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)


def _linear_to_replace(model: nn.Module, name: str) -> nn.Linear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the checkpoint lists a layer {name}, which the rebuilt "
                         f"{type(model).__name__} does not have") from None
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"the checkpoint lists a layer {name}, but in the rebuilt model it "
                         f"is a {type(linear).__name__}, not an nn.Linear")
    return linear


def _check_layer_entry(name: str, entry: dict, linear: nn.Linear):
    features = (entry["in_features"], entry["out_features"])
    if features != (linear.in_features, linear.out_features):
        raise ValueError(f"layer {name}: the checkpoint says in/out features {features[0]}/{features[1]}, "
                         f"the rebuilt model has {linear.in_features}/{linear.out_features}")
    if entry["bias"] != (linear.bias is not None):
        raise ValueError(f"layer {name}: the checkpoint says bias={entry['bias']}, "
                         "the rebuilt model disagrees")


def _check_state_dict_matches(model: nn.Module, weights: dict, tied: dict):
    """Same keys, shapes and quantized dtypes as the rebuilt model, with
    ValueErrors that name the key (load_state_dict would give a RuntimeError,
    and with assign=True it does not compare dtypes)."""
    expected = model.state_dict(keep_vars=True)
    bad_ties = {alias: name for alias, name in tied.items() if name not in weights or alias in weights}
    if bad_ties:
        raise ValueError(f"the weights file does not match the config's tied_weights {bad_ties}")
    stored = set(weights) | set(tied)
    missing, unexpected = sorted(expected.keys() - stored), sorted(stored - expected.keys())
    if missing or unexpected:
        raise ValueError(f"the weights file does not match the model the config describes: "
                         f"missing {_first(missing)}, unexpected {_first(unexpected)}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name} has shape {list(tensor.shape)} in the weights file but "
                             f"{list(expected[name].shape)} in the model the config describes")
        if name.endswith((".w_q", ".w_s")) and tensor.dtype != expected[name].dtype:
            raise ValueError(f"{name} is {tensor.dtype} in the weights file, expected {expected[name].dtype}")


def _first(names, count=5):
    return names[:count] + ([f"... {len(names) - count} more"] if len(names) > count else [])


def _retie(model: nn.Module, tied: dict):
    """Make each alias the very same Parameter (or buffer) as its source, as the
    saved model had it: loading gave them separate objects."""
    for alias, name in tied.items():
        owner_name, _, attribute = alias.rpartition(".")
        source_owner, _, source_attribute = name.rpartition(".")
        source = getattr(model.get_submodule(source_owner), source_attribute)
        setattr(model.get_submodule(owner_name), attribute, source)


# ----------------------------------------------------------------------------- command line

def _quantize_command(args):
    from .models import default_model_path, load_model

    model_path = Path(args.model) if args.model else default_model_path()
    model, _ = load_model(model_path, dtype=FLOAT_DTYPES[args.dtype])
    # parameters() yields a tied parameter once.
    float_bytes = sum(p.numel() for p in model.parameters()) * 4
    plan = GranularityPlan.load(args.plan) if args.plan else None
    quantize_(model, W4A4Config(group_size=args.group_size, act_clip=args.act_clip,
                                weight_clip=args.weight_clip), plan=plan)
    directory = save_quantized(model, args.out, base_model=str(model_path), plan=plan)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    print(f"wrote {directory}: {size / 2**20:.1f} MiB "
          f"({100 * size / float_bytes:.1f}% of FP32 {float_bytes / 2**20:.1f} MiB, "
          f"{200 * size / float_bytes:.1f}% of FP16 {float_bytes / 2**21:.1f} MiB)")


def _info_command(args):
    config = read_checkpoint_config(args.directory)
    layers = config["layers"]
    granularities = {}
    for entry in layers.values():
        key = "per-channel" if entry["group_size"] is None else f"g{entry['group_size']}"
        granularities[key] = granularities.get(key, 0) + 1
    hf_config = config["hf_config"] or {}
    weights = config["weights"]
    print(f"format:        {config['format']} v{config['format_version']}")
    print(f"base model:    {config['base_model']}")
    print(f"model class:   {config['model_class']} ({hf_config.get('model_type', 'no hf_config')}, "
          f"{hf_config.get('num_hidden_layers', '?')} blocks, hidden {hf_config.get('hidden_size', '?')})")
    counts = ", ".join(f"{count} {granularity}" for granularity, count in sorted(granularities.items()))
    print(f"W4A4 layers:   {len(layers)} ({counts}), "
          f"{sum(e['act_rotation'] for e in layers.values())} with an online rotation, "
          f"{sum(e['bias'] for e in layers.values())} with bias")
    print(f"rotated float: {len(config['rotated_float_layers'])} layers with an online rotation left in float")
    print(f"tied weights:  {config['tied_weights'] or 'none'}")
    print(f"weights file:  {weights['file']}, {weights['bytes'] / 2**20:.2f} MiB, sha256 {weights['sha256']}")
    plan = config["plan"]
    print(f"plan:          {'none' if plan is None else GranularityPlan.from_dict(plan).counts()}")
    rotation = config["rotation"]
    mode = rotation.get("mode", "recorded") if isinstance(rotation, dict) else "recorded"
    print(f"rotation:      {'none' if rotation is None else mode}")


FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _group_size_argument(text: str):
    return None if text == "channel" else int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m torch_apex4.checkpoint",
                                     description="Save and inspect W4A4 quantized checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    quantize = commands.add_parser("quantize", help="quantize a model (round to nearest) and save it")
    quantize.add_argument("--model", help="Hugging Face model folder or .gguf file "
                                          "(default: the SmolLM2-135M GGUF)")
    quantize.add_argument("--group-size", type=_group_size_argument, default=128,
                          help="a multiple of 64, or 'channel' for per-channel (default 128)")
    quantize.add_argument("--act-clip", type=float, default=1.0)
    quantize.add_argument("--weight-clip", type=float, default=1.0)
    quantize.add_argument("--plan", help="GranularityPlan JSON file (plan.py): per-layer "
                                         "granularities overriding --group-size")
    quantize.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32",
                          help="dtype of the parameters left in floating point (embeddings, norms, LM head)")
    quantize.add_argument("--out", required=True, help="checkpoint directory")
    quantize.set_defaults(run=_quantize_command)
    info = commands.add_parser("info", help="print a checkpoint's config summary")
    info.add_argument("directory")
    info.set_defaults(run=_info_command)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:  # a bad checkpoint or argument: the message says it all
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
