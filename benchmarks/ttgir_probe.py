"""Compile our Triton kernels for sm_90 on a machine without a GPU, and count what matters.

Why: the GPU budget is minutes per session, while a layout problem is visible in the compiler's
output. Triton compiles for a named target without a driver (ptxas ships with it), so TTGIR and
SASS can be read here: `ttg.convert_layout` ops (each a trip through shared memory and a
barrier), and SASS counts of shared-memory traffic, barriers and integer work. Session 8 found the
dropout's cost this way (docs/design.md §4): five conversions per forward tile, none after.

Use the Triton version the GPU machine runs (3.6 there): layout passes change between versions.

    pip download --no-deps triton==3.6.0 -d /tmp/tr36 && pip install --no-deps --target /tmp/tr36site /tmp/tr36/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/tr36site python benchmarks/ttgir_probe.py --dropout --head-dim 64 [--ttgir-out fwd.ttgir]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flash_inductor.kernels import triton_attention as ta

KERNELS = {"fwd": ta._attn_fwd, "dkdv": ta._attn_bwd_dkdv, "dq": ta._attn_bwd_dq}
_POINTER_TYPES = {"Lse": "*fp32", "Delta": "*fp32", "DQAcc": "*fp32", "Seed": "*i64", "Counts": "*i32", "Tiles": "*i32",
                  "CuQ": "*i32", "CuK": "*i32"}
_SCALARS = {"Hq", "G", "Nq", "Nk", "N_BUCKET"}
_FLOATS = {"qk_scale", "cap_scale", "drop_scale", "sm_scale", "scale"}
SASS_OPS = ("LDGSTS", "STS", "LDS", "BAR", "SHFL", "IMAD", "LOP3", "PRMT", "SEL", "ISETP", "MUFU", "HGMMA", "STL", "LDL")


def compile_kernel(name: str, block_m: int, block_n: int, warps: int, stages: int, head_dim: int,
                   dropout: bool, causal: int, bias: bool, arch: int = 90, softcap: bool = False,
                   fused_dq: bool = False, lengths_divisible: bool = True):
    """One kernel, one config, as `triton.compile` builds it for the GPU (bf16 inputs), specialised
    as a real launch is: pointers and strides divisible by 16, unit last strides as the constant 1,
    and (with `lengths_divisible`, e.g. N=8192) the sequence lengths divisible by 16. Without the
    lengths' divisibility Triton cannot prove a masked bias load 16-byte aligned and leaves it
    unpipelined, with two extra layout conversions: what session 12 read off this probe before it
    specialised anything, and took for the cost of a bias at every length."""
    fn = KERNELS[name].fn
    meta = dict(D=head_dim, DV=head_dim, BLOCK_D=head_dim, BLOCK_DV=head_dim, ELT_BYTES=2, CAUSAL=causal,
                HAS_BIAS=bias, BIAS_IS_BOOL=False, HAS_DROPOUT=dropout, DOT_PRECISION="tf32", SCORES=2 if softcap else 1, SPARSE=False,
                TILE=128, VARLEN=False, BLOCK_M=block_m, BLOCK_N=block_n, STORE_DS=False, FUSED_DQ=fused_dq,
                stride_bn=1, stride_lm=1)
    signature, constexprs = {}, {}
    for arg in fn.arg_names:
        if arg in meta:
            signature[arg], constexprs[arg] = "constexpr", meta[arg]
        elif arg in _FLOATS:
            signature[arg] = "fp32"
        elif arg[0].isupper() and arg not in _SCALARS:
            signature[arg] = _POINTER_TYPES.get(arg, "*bf16")
        else:
            signature[arg] = "i32"
    divisible = [i for i, arg in enumerate(fn.arg_names) if arg not in constexprs and (
        (signature[arg].startswith("*") and arg not in ("Counts", "Tiles", "CuQ", "CuK"))
        or (arg.startswith("stride") and signature[arg] == "i32")
        or (lengths_divisible and arg in ("Nq", "Nk", "N_BUCKET")))]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def layout_conversions(compiled) -> int:
    return len(re.findall(r"ttg\.convert_layout", compiled.asm["ttgir"]))


def _cuobjdump() -> str | None:
    """Triton's wheel ships cuobjdump beside its ptxas; a CUDA toolkit's is the fallback."""
    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def sass_text(compiled) -> str | None:
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) per SASS instruction, predicates dropped."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in re.finditer(
        r"/\*([0-9a-f]{4,5})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);", sass)]


def sass_counts(compiled) -> collections.Counter | None:
    sass = sass_text(compiled)
    if sass is None:
        return None
    return collections.Counter(op.split(".")[0] for _, op, _ in _instructions(sass))


def loop_counts(compiled) -> list[tuple[int, collections.Counter]]:
    """Per innermost loop (a backward branch's span), its length and opcode counts: the
    instructions every key or query block pays, which whole-kernel counts blur."""
    sass = sass_text(compiled)
    if sass is None:
        return []
    insts = _instructions(sass)
    loops = []
    for addr, op, rest in insts:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return [(hi - lo, collections.Counter(op.split(".")[0] for a, op, _ in insts if lo <= a <= hi))
            for lo, hi in sorted(set(innermost))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--config", nargs=4, type=int, default=(64, 64, 4, 3), metavar=("BLOCK_M", "BLOCK_N", "WARPS", "STAGES"))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dropout", action="store_true")
    ap.add_argument("--bias", action="store_true")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--softcap", action="store_true")
    ap.add_argument("--fused-dq", action="store_true", help="the dK/dV kernel adds dQ with atomics")
    ap.add_argument("--odd-lengths", action="store_true", help="sequence lengths not divisible by 16")
    ap.add_argument("--ttgir-out", default=None, help="write the last kernel's TTGIR here")
    ap.add_argument("--loops", action="store_true", help="also count each innermost loop's instructions")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90, config {args.config}, D={args.head_dim}, dropout={args.dropout}, "
          f"bias={args.bias}, causal={args.causal}, softcap={args.softcap}, fused_dq={args.fused_dq}")
    for name in args.kernels:
        c = compile_kernel(name, *args.config, args.head_dim, args.dropout, args.causal, args.bias,
                           softcap=args.softcap, fused_dq=args.fused_dq, lengths_divisible=not args.odd_lengths)
        ops = sass_counts(c)
        sass = ("no cuobjdump" if ops is None else
                f"SASS {sum(ops.values()):5d}  " + "  ".join(f"{op} {ops[op]}" for op in SASS_OPS))
        print(f"{name:5s} convert_layout {layout_conversions(c):3d}  {sass}", flush=True)
        if args.loops:
            for span, ops in loop_counts(c):
                if ops["HGMMA"]:
                    print(f"      loop of {sum(ops.values()):4d}: " + "  ".join(
                        f"{op} {ops[op]}" for op in ("HGMMA", "FSEL", "FSETP", "FADD", "FFMA", "FMUL", "MUFU", "BAR", "SHFL", "LDS", "STS", "STL", "LDL")))
        if args.ttgir_out:
            with open(args.ttgir_out, "w") as f:
                f.write(c.asm["ttgir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
