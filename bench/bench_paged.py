"""`python bench/bench_paged.py [options]` = `rollout bench paged [options]` (see rollout/bench/paged.py)."""

import sys

from rollout.bench.paged import main

if __name__ == "__main__":
    sys.exit(main())
