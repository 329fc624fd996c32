"""`python bench/bench_backends.py [options]` = `rollout bench backends [options]` (see rollout/bench/backends.py)."""

import sys

from rollout.bench.backends import main

if __name__ == "__main__":
    sys.exit(main())
