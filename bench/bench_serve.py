"""`python bench/bench_serve.py [options]` = `rollout bench serve [options]` (see rollout/bench/serve.py)."""

import sys

from rollout.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
