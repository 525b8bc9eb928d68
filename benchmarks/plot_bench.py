"""Bar chart of bench_attention.py JSON results: forward and backward TFLOP/s per case and kernel.

    python benchmarks/plot_bench.py benchmarks/results/*.json --out benchmarks/results/plot.png

Several files (runs of one machine kind) are merged row by row; each file's meta (device,
versions, command) is printed so the figure can be traced to its runs.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metas = [], []
    for path in args.files:
        with open(path) as f:
            data = json.load(f)
        metas.append(data["meta"])
        rows += [r for r in data["rows"] if r["status"] == "ok"]
    for m in metas:
        print(f"{m['date']} {m['device']} torch {m['torch']} triton {m['triton']}: {m['command']}")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / len(peers)
    for ax, phase in zip(axes, ("fwd", "bwd")):
        for i, peer in enumerate(peers):
            vals = [next((r[f"{phase}_tflops"] for r in rows if r["case"] == c and r["peer"] == peer), 0.0)
                    for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], vals, width, label=peer)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=20)
        ax.set_title(f"{phase}, TFLOP/s (0 = refused or not run)")
    axes[0].legend()
    n = sorted({r["n"] for r in rows})
    fig.suptitle(f"{metas[0]['device']}, bf16, B=1 H=12 D=128 N={','.join(map(str, n))}, "
                 f"torch {metas[0]['torch']}, triton {metas[0]['triton']}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
