"""The apex4 torch.compile backend on CUDA: sibling layers fused into one
GEMM (read through a view of the first layer's weights, which CUDA graphs
must not copy), the decode pair and Inductor's CUDA graphs, against eager.
Skipped without a GPU."""
import pytest
import torch

import torch_apex4 as apex4
from torch_apex4.quantize import consecutive_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("tokens", [1, 40])
@pytest.mark.parametrize("group_size", [None, 64])
def test_compiled_fused_model_matches_eager_on_cuda(tiny_llama, mode, tokens, group_size):
    model = tiny_llama.to("cuda")
    apex4.quantize_(model, apex4.W4A4Config(group_size=group_size))
    attn = model.model.layers[0].self_attn
    assert consecutive_rows([attn.q_proj.w_q, attn.k_proj.w_q, attn.v_proj.w_q])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="apex4", mode=mode)
    ids = torch.randint(0, 256, (1, tokens), device="cuda")
    with torch.inference_mode():
        eager = model(ids).logits
        for _ in range(3):  # CUDA graph trees record on a later call than the first
            out = compiled(ids).logits.clone()
    # Inductor may reorder float reductions (RMSNorm, softmax): close, not equal.
    torch.testing.assert_close(out, eager, rtol=0, atol=2e-2 * eager.abs().max().item())
    assert (out - eager).abs().mean() < 1e-3 * eager.abs().mean()
