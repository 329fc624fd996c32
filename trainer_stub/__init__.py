"""A minimal JAX trainer that drives `rollout`: params from an HF checkpoint or fresh init, a
GRPO-style policy-gradient step, and the RL loop the `rollout demo` runs.

    model_io.py         parameters from an HF checkpoint (rollout's loader) or fresh init
    tasks.py            the toy task and its verifiable reward
    grpo.py             group-normalized advantages, the masked policy-gradient loss, the jitted step
    train.py            the RL loop (generate -> reward -> logprob check -> update -> sync), `main()`
    agent.py            `demo --agent`: multi-turn calculator episodes as token-exact Trajectories
    records.py          the loop's settings and what it records (per step, per run)
    report.py           what the demo shows: progress bar, summary table, reward plot
    dummy_then_real.py  start an engine on dummy weights, swap real ones in, generate

Importing this package imports neither jax nor ray.
"""
