"""The worker side: what runs inside each Ray actor.

- `actor`: the Ray actor class (a thin shell: Ray options, devices, the engine's start).
- `host`: `WorkerHost`, the actor's logic as a plain class (testable without Ray): one engine,
  weight inboxes, the relay tree's forwarding, streams.
- `cpu_malloc`: the allocator settings a CPU worker process starts with.

What crosses from the driver is declared in `rollout.protocol`.
"""
