"""Perplexity of a causal language model over a token stream, in independent fixed-size windows."""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm


def tokenize_text(tokenizer, text, max_tokens):
    """The first `max_tokens` token ids of `text`, shape [1, n].

    No special tokens (BOS/EOS) are added, so only the text itself is scored.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    # A contiguous copy: the ids of the whole text can be freed, and strides are those of a [1, n] tensor.
    return ids[:, :max_tokens].clone(memory_format=torch.contiguous_format)


def perplexity(model, input_ids, window=512, progress=True, desc="perplexity"):
    """Return (perplexity, tokens_per_s) of `model` on `input_ids` (shape [n] or [1, n]).

    The ids are cut into non-overlapping windows of `window` tokens (the last one may be shorter),
    each scored on its own: tokens 1..len-1 of a window are predicted from the ones before them.
    Perplexity is exp of the mean negative log-likelihood over all predicted tokens; tokens_per_s
    counts every token fed to the model, over the wall time of all forward passes.
    """
    ids = input_ids.reshape(1, -1)
    # A window of one token predicts nothing, so a 1-token tail is dropped.
    starts = [s for s in range(0, ids.shape[1], window) if ids.shape[1] - s >= 2]
    if not starts:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {ids.shape[1]}")
    total_nll, predicted, fed = 0.0, 0, 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in tqdm(starts, desc=desc, unit="window", disable=not progress):
            # A contiguous copy gives every window the same strides: a compiled model guards on them
            # and would recompile for a view into a differently sized tensor (plain clone() keeps its strides).
            chunk = ids[:, start:start + window].clone(memory_format=torch.contiguous_format)
            logits = model(chunk, use_cache=False).logits
            total_nll += F.cross_entropy(logits[0, :-1].float(), chunk[0, 1:], reduction="sum").item()
            predicted += chunk.shape[1] - 1
            fed += chunk.shape[1]
    elapsed = time.perf_counter() - started
    return math.exp(total_nll / predicted), fed / elapsed
