"""`python bench/bench_sync.py [options]` = `rollout bench sync [options]` (see rollout/bench/sync.py)."""

import sys

from rollout.bench.sync import main

if __name__ == "__main__":
    sys.exit(main())
