"""The `flash-inductor` command: info, build, bench, explain, demo, coverage."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import platform

    import torch

    from . import dispatch
    from .backends.triton import _triton_import_error
    from .inputs import validate

    print(f"flash-inductor {__import__('flash_inductor').__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    err = _triton_import_error()
    if err:
        print(f"triton: not importable ({err})")
    else:
        import triton

        print(f"triton {triton.__version__}")
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        print(f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name()} (compute capability {cc[0]}.{cc[1]})")
        device = "cuda"
    else:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"CUDA: not available ({why}); attention runs on the CPU: PyTorch's fused CPU kernel "
              "(aten_cpu) where it accepts the input, else the PyTorch reference")
        device = "cpu"
    from .cutlass_build import AMPERE, BWD_HEAD_DIMS, HOPPER_D64, HOPPER_DROPOUT, HOPPER_DROPOUT_D64, bwd_family, status

    print(f"CUTLASS kernels: {status()}")
    print(f"CUTLASS dropout forward kernels: {status(HOPPER_DROPOUT)}")
    print(f"CUTLASS kernels, head dim 64: {status(HOPPER_D64)}")
    print(f"CUTLASS dropout forward kernels, head dim 64: {status(HOPPER_DROPOUT_D64)}")
    for head_dim in BWD_HEAD_DIMS:
        print(f"CUTLASS backward kernels, head dim {head_dim}: {status(bwd_family(head_dim))}")
        print(f"CUTLASS dropout backward kernels, head dim {head_dim}: {status(bwd_family(head_dim, True))}")
    print(f"CUTLASS sm_80 kernels: {status(AMPERE)}")
    forced = dispatch.forced_kernel()
    print(f"kernel setting ({dispatch.ENV_VAR}): {forced or 'automatic'}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.empty(1, 8, 128, 64, device=device, dtype=dtype)
    inp = validate(q, q, q)
    print(f"a {str(dtype).replace('torch.', '')} [1, 8, 128, 64] attention on {device} would run on:")
    for name, reasons in dispatch.reasons_by_backend(inp).items():
        print(f"  {name:<12} {'accepts' if not reasons else 'refuses: ' + '; '.join(reasons)}")
    return 0


def _explain(args) -> int:
    import torch

    from .explain import explain
    from .models import build

    built = build(args.model, size=args.size, attn_implementation=args.impl, seq_len=args.seq)
    built.model.train(args.train)
    print(f"{args.model} ({args.size} config), attn_implementation={args.impl}, "
          f"{'training' if args.train else 'inference'}: {built.num_attention_layers} attention layers")
    report = explain(built.model, **built.inputs)
    print(report)
    return 0 if report.rewritten == built.num_attention_layers and not report.skipped else 1


def _demo(args) -> int:
    from .demo import run_demo

    res = run_demo(args.model, size=args.size, batch=args.batch, seq_len=args.seq,
                   attn_implementation=args.impl, train=args.train, repeats=args.repeats,
                   device=args.device, compare_inductor=args.compare_inductor)
    return 0 if res["sites"] == res["attention_layers"] else 1


def _coverage(args) -> int:
    from .coverage import run

    rows = run(args.models, args.impls, args.modes, compile=args.compile)
    if args.markdown:
        from .coverage import markdown

        print(markdown(rows))
    unsupported = [r for r in rows if r.error.startswith("build:")]
    bad = [r for r in rows if not r.ok and r not in unsupported]
    print(f"{len(rows) - len(bad) - len(unsupported)}/{len(rows)} rows at 100% with parity; "
          f"{len(unsupported)} without that attention implementation in this transformers version; "
          f"{len(bad)} failing")
    return 1 if bad else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own argparse (flash_inductor/bench.py), shared with benchmarks/
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["build"]:  # its own argparse (flash_inductor/cutlass_build.py)
        from .cutlass_build import main as build_main

        return build_main(argv[1:])
    parser = argparse.ArgumentParser(prog="flash-inductor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is available on this machine, and why anything is not")
    sub.add_parser("bench", help="time the kernels against SDPA's backends, FlexAttention and eager "
                   "(GPU; `flash-inductor bench --help`)")
    sub.add_parser("build", help="build the CUTLASS kernels ahead of time (otherwise built on first use; "
                   "`flash-inductor build --help`)")

    def model_args(p, size, seq):
        from .models import MODELS

        p.add_argument("--model", default="bert", choices=MODELS)
        p.add_argument("--size", default=size, choices=("tiny", "base"))
        p.add_argument("--impl", default="eager", choices=("eager", "sdpa"), help="attn_implementation")
        p.add_argument("--seq", type=int, default=seq, help="sequence length")
        p.add_argument("--train", action="store_true", help="training mode (forward + backward)")

    ex = sub.add_parser("explain", help="print the rewrite report of a HuggingFace model")
    model_args(ex, "tiny", 16)
    demo = sub.add_parser("demo", help="compile a HuggingFace model with backend='flash': report, parity, timing")
    model_args(demo, "base", 128)
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--repeats", type=int, default=10)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--compare-inductor", action="store_true", help="also time backend='inductor'")
    from .coverage import MODES
    from .models import COVERAGE

    cov = sub.add_parser("coverage", help="rewrite coverage and parity over HuggingFace architectures")
    cov.add_argument("--models", nargs="+", default=list(COVERAGE))
    cov.add_argument("--impls", nargs="+", default=["eager", "sdpa"], choices=("eager", "sdpa"))
    cov.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    cov.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    cov.add_argument("--compile", action="store_true",
                     help="also time each row's first call through backend='flash' (Inductor; slow)")
    args = parser.parse_args(argv)
    return {"info": _info, "explain": _explain, "demo": _demo, "coverage": _coverage}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
