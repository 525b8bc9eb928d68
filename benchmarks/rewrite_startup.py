"""Start-up cost of the rewrite against Inductor's compile time (issue 5's ≤ 10% target).

For each tiny HF model, in inference and in a training step: wall time of the first call of
torch.compile(model, backend="flash") (Dynamo + rewrite + AOTAutograd + Inductor, caches off)
and the time spent in the rewrite itself (counters["flash_inductor"]["rewrite_us"]).

    python benchmarks/rewrite_startup.py
"""

import time
import warnings

import torch
from torch._dynamo.utils import counters

from flash_inductor.models import MODELS, build, main_output

warnings.filterwarnings("ignore")


def main():
    for name in MODELS:
        for train in (False, True):
            torch._dynamo.reset()
            counters.clear()
            built = build(name)
            model = built.model.train(train)
            with torch._inductor.config.patch(force_disable_caches=True):
                t0 = time.perf_counter()
                out = main_output(torch.compile(model, backend="flash")(**built.inputs))
                if train:
                    out.sum().backward()
                total = time.perf_counter() - t0
            rewrite = counters["flash_inductor"]["rewrite_us"] / 1e6
            print(f"{name:6} {'train' if train else 'infer'}  first call {total:6.2f} s  "
                  f"rewrite {rewrite * 1e3:6.1f} ms  ({100 * rewrite / total:.2f}%)")


if __name__ == "__main__":
    main()
