"""`python bench/bench_fanout.py [options]` = `rollout bench fanout [options]` (see rollout/bench/fanout.py)."""

import sys

from rollout.bench.fanout import main

if __name__ == "__main__":
    sys.exit(main())
