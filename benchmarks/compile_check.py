"""Compile the Triton kernels for sm_90 on a machine without a GPU, and show what Triton made.

    python benchmarks/compile_check.py            # every fwd/bwd variant compiles (D=128, bf16)
    python benchmarks/compile_check.py --ttgir fwd --bias   # print the pipelined loads of one

Triton lowers to PTX and runs ptxas without a driver, so this catches compile errors (types,
layouts, shared-memory overflow) and shows whether a load became an async copy (pipelined)
before any device time is spent. Pointers and strides are marked divisible by 16 and the bias's
last stride is the constant 1, as the real launches specialise them; without that, no load is
ever pipelined and the picture is wrong.
"""

import argparse

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flash_inductor.kernels import triton_attention as ta

KERNELS = {"fwd": (ta._attn_fwd, 128, 64, 8), "dkdv": (ta._attn_bwd_dkdv, 32, 128, 4), "dq": (ta._attn_bwd_dq, 128, 32, 4)}


def compile_one(which, causal, bias, dropout, float_type="fp32", stages=3, sparse=False, varlen=False):
    kernel, bm, bn, warps = KERNELS[which]
    fn = kernel.fn
    consts = dict(D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, ELT_BYTES=2, BIAS_IS_BOOL=False,
                  DOT_PRECISION="tf32", SCORES=1, CAUSAL=causal, HAS_BIAS=bias, HAS_DROPOUT=dropout,
                  BLOCK_M=bm, BLOCK_N=bn, stride_bn=1, SPARSE=sparse, TILE=128, VARLEN=varlen)
    if not varlen:
        consts["stride_lm"] = 1  # dense lse/delta rows are contiguous, as real launches specialise
    if which == "dq":
        consts["STORE_DS"] = bias
    if which == "dkdv":
        consts["FUSED_DQ"] = False
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("Seed",):
            sig[name] = "*i64"
        elif name in ("Counts", "Tiles", "CuQ", "CuK"):
            sig[name] = "*i32"
        elif name in ("Lse", "Delta", "DQAcc"):
            sig[name] = "*fp32"
        elif name in ("Q", "K", "V", "Bias", "Out", "DO", "DQ", "DK", "DV_", "DS"):
            sig[name] = "*bf16"
        elif name in ("qk_scale", "sm_scale", "drop_scale"):
            sig[name] = float_type  # Inductor passes float64
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if (sig[n].startswith("*") and n not in ("Counts", "Tiles", "CuQ", "CuK"))
             or (n.startswith("stride") and sig[n] == "i32")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ttgir", choices=list(KERNELS))
    ap.add_argument("--bias", action="store_true")
    ap.add_argument("--dropout", action="store_true")
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args()
    if args.ttgir:
        k = compile_one(args.ttgir, int(args.causal), args.bias, args.dropout)
        g = k.asm["ttgir"]
        for line in g.splitlines():
            if "tt.load" in line or "async_copy_global_to_local" in line:
                print(line.strip()[:160])
        print(f"shared memory {k.metadata.shared} B")
        return
    for which in KERNELS:
        smem = []
        for causal in (0, 1):
            for bias in (False, True):
                for dropout in (False, True):
                    for ft in ("fp32", "fp64"):
                        smem.append(compile_one(which, causal, bias, dropout, ft).metadata.shared)
                    if bias:  # a mask-like bias: the tile-list loops (mask_tiles.py)
                        smem.append(compile_one(which, causal, bias, dropout, sparse=True).metadata.shared)
                    else:  # packed variable-length batches
                        smem.append(compile_one(which, causal, bias, dropout, varlen=True).metadata.shared)
        print(f"{which}: {len(smem)} variants compile; shared memory {min(smem)}..{max(smem)} B")


if __name__ == "__main__":
    main()
