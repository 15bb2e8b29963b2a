"""`python -m torch_apex4 <command>`.

    probe   measure this GPU's rates and rho (torch_apex4/rho.py), cache and print them
    rho     print the rho table (vendor figures) and the cached probes
    plan    print the kernel plan (variant and predicted time per token count) for layer shapes

A command is a function taking the parsed arguments, registered in COMMANDS
with the function that adds its arguments.
"""
import argparse
import json
import sys


def _probe_arguments(parser):
    parser.add_argument("--device", default=None, help="CUDA device (default: the current one)")
    parser.add_argument("--json", metavar="PATH", help="also write the measurement as JSON")


def _probe(args):
    from . import rho

    result = rho.probe(args.device)
    path = rho.store_probe(result)
    print(rho.format_probe(result))
    print(f"cached in {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(probe=result.to_dict(), spec=result.spec().to_dict()), f, indent=1)


def _rho_arguments(parser):
    pass


def _rho(args):
    from . import rho

    print(f"{'GPU':<18} {'kind':>4} {'tensor TOP/s':>12} {'FP32 TFLOP/s':>12} {'rho':>6}  source")
    for _, spec in rho.KNOWN_GPUS:
        print(f"{spec.name:<18} {spec.tensor_kind:>4} {spec.tensor_tops:>12.0f} "
              f"{spec.fp32_tflops:>12.1f} {spec.rho:>6.1f}  {spec.source}")
    cached = rho.read_cache()
    for key, entry in cached.items():
        try:
            spec = rho.ProbeResult(**entry).spec()
        except TypeError:
            continue
        print(f"probed: {key}: rho {spec.rho:.1f} ({spec.tensor_kind} {spec.tensor_tops:.0f} / "
              f"{spec.fp32_tflops:.1f})")


def _plan_arguments(parser):
    parser.add_argument("--gpu", default="H100", help="a GPU of the rho table (name pattern), "
                        "or 'probe' for the current GPU (default: H100)")
    parser.add_argument("--shape", nargs=2, type=int, action="append", metavar=("K", "N"),
                        help="a layer's K and N (repeatable; default: LLaMA-2-7B's)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 512, 2048, 8192])
    parser.add_argument("--granularities", nargs="+", default=["pc", "g64", "g128", "g256"])


def _plan(args):
    from . import costmodel, planner, rho
    from .plan import parse_granularity

    spec = rho.gpu_spec() if args.gpu == "probe" else rho.known_gpu(args.gpu)
    if spec is None:
        sys.exit(f"no GPU of the rho table matches {args.gpu!r}")
    shapes = args.shape or [(4096, 4096), (4096, 11008), (11008, 4096)]
    model = costmodel.CostModel(spec)
    p = planner.Planner(model)
    for k, n in shapes:
        for label in args.granularities:
            print(p.kernel_table(n, k, parse_granularity(label), args.tokens))
            print()


COMMANDS = {
    "probe": (_probe_arguments, _probe),
    "rho": (_rho_arguments, _rho),
    "plan": (_plan_arguments, _plan),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m torch_apex4",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        doc = next(line for line in __doc__.splitlines() if line.strip().startswith(name + " "))
        add_arguments(sub.add_parser(name, help=doc.strip()[len(name):].strip()))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except (RuntimeError, ValueError, LookupError) as error:
        sys.exit(f"python -m torch_apex4 {args.command}: {error}")


if __name__ == "__main__":
    main()
