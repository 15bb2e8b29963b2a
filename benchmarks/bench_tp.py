"""Tensor-parallel throughput: a LLaMA-2-70B-shaped stack of decoder layers
(random fp16 weights), FP16 against apex4 W4A4, both sharded with
torch_apex4.parallelize_ over the same ranks. Prefill of --prefill tokens (batch 1)
and greedy decode at each --batch after a --prompt, tokens/s, printed as a
table by rank 0.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 4 benchmarks/bench_tp.py --json tp4.json

On the CPU (gloo) `--tiny` runs the same code on a small model, as a check
that the script works; its timings mean nothing.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import torch_apex4 as apex4

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


def build_model(shape, layers, granularity, device, dtype):
    """The model on `device`, quantized unless granularity is "fp16". Every
    rank builds the same weights (same seed) before sharding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=8192)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    if granularity != "fp16":
        group = None if granularity == "pc" else int(granularity.removeprefix("g"))
        apex4.quantize_(model, apex4.W4A4Config(group_size=group))
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _median_time(run, device, repeats):
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


@torch.no_grad()
def prefill_rate(model, tokens, device, repeats):
    """Prompt tokens per second of one forward pass over `tokens`."""
    return tokens.numel() / _median_time(lambda: model(tokens), device, repeats)


@torch.no_grad()
def decode_rate(model, prompt, steps, device, repeats):
    """Generated tokens per second of greedy decoding after `prompt`."""
    from transformers import DynamicCache

    def run():
        cache = DynamicCache()
        out = model(prompt, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)

    prompt_s = _median_time(lambda: model(prompt), device, repeats)
    return prompt.shape[0] * steps / (_median_time(run, device, repeats) - prompt_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers in the stack")
    parser.add_argument("--granularities", nargs="+", default=["fp16", "pc", "g128"])
    parser.add_argument("--prefill", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--decode", type=int, default=64, help="generated tokens")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="decode batches")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a small model (CPU smoke test)")
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    shape = TINY if args.tiny else LLAMA2_70B
    dtype = torch.float16 if cuda else torch.float32
    rows = []
    for granularity in args.granularities:
        model = apex4.parallelize_(build_model(shape, args.layers, granularity, device, dtype))
        tokens = torch.randint(0, shape["vocab_size"], (max(args.batch), args.prefill),
                               device=device, generator=torch.Generator(device).manual_seed(1))
        row = dict(granularity=granularity, tp=world,
                   prefill_tok_s=prefill_rate(model, tokens[:1], device, args.repeats))
        for batch in args.batch:
            row[f"decode_b{batch}_tok_s"] = decode_rate(model, tokens[:batch, :args.prompt],
                                                        args.decode, device, args.repeats)
        rows.append(row)
        del model
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "cpu (gloo)"
        print(f"{name}, TP={world}, {args.layers} layers of shape {shape}")
        columns = ["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in args.batch]
        print(f"{'granularity':>11} " + " ".join(f"{c:>22}" for c in columns))
        base = next((r for r in rows if r["granularity"] == "fp16"), None)
        for r in rows:
            cells = [f"{r[c]:10.1f}" + (f" ({r[c] / base[c]:.2f}x fp16)" if base else "")
                     for c in columns]
            print(f"{r['granularity']:>11} " + " ".join(f"{c:>22}" for c in cells))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=name, tp=world, layers=args.layers, shape=shape, rows=rows), f,
                          indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
