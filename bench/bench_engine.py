"""`python bench/bench_engine.py [options]` = `rollout bench engine [options]` (see rollout/bench/engine.py)."""

import sys

from rollout.bench.engine import main

if __name__ == "__main__":
    sys.exit(main())
