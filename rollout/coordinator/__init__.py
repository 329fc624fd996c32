"""The driver side: what runs in the user's process (the service, the fleet of worker actors,
request dispatch and re-sends, streaming, scoring fan-out, the two-phase weight sync).

Nothing here runs inside a worker; what crosses to the workers is declared in `rollout.protocol`.
"""
