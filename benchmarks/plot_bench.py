"""Bar chart of `flash-inductor bench --json` results (flash_inductor.bench.plot).

    python benchmarks/plot_bench.py benchmarks/results/*.json --out benchmarks/results/plot.png

Several files (runs of one machine kind) are merged row by row; each file's meta (device,
versions, command) is printed so the figure can be traced to its runs.
"""

from __future__ import annotations

import argparse
import json

from flash_inductor.bench import plot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    runs = []
    for path in args.files:
        with open(path) as f:
            runs.append(json.load(f))
    for run in runs:
        m = run["meta"]
        print(f"{m['date']} {m['device']} torch {m['torch']} triton {m['triton']}: {m['command']}")
    plot(runs, args.out)


if __name__ == "__main__":
    main()
