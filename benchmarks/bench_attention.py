"""The kernel benchmark; the code is flash_inductor/bench.py, also run by `flash-inductor bench`.

    python benchmarks/bench_attention.py --lengths 2048 4096 8192 --json out.json --markdown
"""

import sys

from flash_inductor.bench import main

if __name__ == "__main__":
    sys.exit(main())
