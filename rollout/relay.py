"""Relay: buckets travel coordinator -> one node -> the others, so the coordinator's node sends
about one model per sync whatever the number of worker nodes.

Without it every worker fetches every bucket from the coordinator's object store, and the
coordinator's node sends (worker nodes x model) bytes per sync. Ray's object manager pulls an
object from a node chosen at random among those that hold a copy, and the coordinator's node
always holds one, so a second `ray.get` of the same ref elsewhere still comes from the
coordinator part of the time (gets one after the other: 1 + 1/2 + 1/3 ... copies from it on
average, 2 of 3 in a test here; gets at once: N copies, before any node holds a whole object;
bench/bench_fanout.py measures 2.8 of 4 for a pipelined sync). Ray offers no way to pick the
source, so a relaying worker puts each bucket it has fetched and verified into its own node's
object store once more, as a new object only it holds, and hands that ref to the workers below.

The plan is a tree over nodes (`plan_relay`): the coordinator's node feeds one node; every
node feeds up to `fanout` others (a `fanout`-ary heap in node order). All workers of a node
read the same ref (Ray fetches it into the node once) and the node's first worker (its
"lead") relays for the nodes below. Workers on the coordinator's node read its copy in place.

Every worker still gets the original refs and checksums from the coordinator: a bucket whose
relay fails (the parent died, aborted, restarted, or sent bytes whose checksum does not match)
is fetched from the coordinator instead, so a lost node costs bytes, never a hang.

    roles = plan_relay({0: "n1", 1: "n2", 2: "n3"}, coordinator_node="head", fanout=2)
    roles[0]  # RelayRole(parent=None, relays=True): fetches from the coordinator, relays
    roles[1]  # RelayRole(parent=0, relays=False): fetches from worker 0's relay copies

Worker side: `RelayPoint` keeps one worker's relay copies per sync and fetches its buckets.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
from typing import Any, Awaitable, Callable, Mapping, Sequence

log = logging.getLogger("rollout.relay")

# How long a parent waits for a sync it has not heard of (its stage call may still be on the
# way) before it says it holds nothing: a restarted parent never hears of it.
UNKNOWN_SYNC_GRACE_S = 5.0
_KEPT_SYNCS = 2  # relay copies of the last syncs kept until their commit or abort


@dataclasses.dataclass(frozen=True)
class RelayRole:
    """What one worker does in one sync: fetch from `parent`'s relay copies (None: from the
    coordinator), and whether to put relay copies of its own for workers below it."""

    parent: int | None = None
    relays: bool = False


def plan_relay(worker_nodes: Mapping[int, str | None], coordinator_node: str | None, fanout: int) -> dict[int, RelayRole]:
    """Each worker's role: a `fanout`-ary tree over the worker nodes other than the
    coordinator's, in order of their first worker; the coordinator's node feeds the first.

    A worker whose node is unknown (None) fetches from the coordinator and relays nothing.

    >>> roles = plan_relay({0: "a", 1: "b", 2: "c", 3: "d", 4: "b"}, "head", fanout=2)
    >>> [(w, r.parent, r.relays) for w, r in sorted(roles.items())]
    [(0, None, True), (1, 0, True), (2, 0, False), (3, 1, False), (4, 0, False)]
    >>> sorted((w, r.parent) for w, r in plan_relay({0: "head", 1: "a"}, "head", 2).items())
    [(0, None), (1, None)]
    >>> {r.parent for r in plan_relay({0: "a", 1: "b"}, "head", fanout=0).values()}
    {None}
    """
    roles = {w: RelayRole() for w in worker_nodes}
    if fanout < 1:
        return roles
    nodes: dict[str, list[int]] = {}  # remote node -> its workers, nodes in order of first worker
    for worker in sorted(worker_nodes):
        node = worker_nodes[worker]
        if node is not None and node != coordinator_node:
            nodes.setdefault(node, []).append(worker)
    order = list(nodes)
    for j, node in enumerate(order):
        if j == 0:
            continue  # fed by the coordinator's node
        parent_lead = nodes[order[(j - 1) // fanout]][0]
        roles[parent_lead] = RelayRole(roles[parent_lead].parent, True)
        for worker in nodes[node]:
            roles[worker] = RelayRole(parent_lead, roles[worker].relays)
    return roles


def to_wire(role: RelayRole, handles: Sequence[Any]) -> dict[str, Any] | None:
    """The role as a stage() argument: the parent as an actor handle. None: no relay part."""
    if role.parent is None and not role.relays:
        return None
    return {"parent": None if role.parent is None else handles[role.parent], "parent_index": role.parent,
            "relays": role.relays}


class RelayClosed(RuntimeError):
    """This worker holds no relay copy of the bucket asked for (the sync ended here, failed, or
    was never staged here); the asking worker fetches from the coordinator instead."""


class _SyncCopies:
    def __init__(self, wire: dict[str, Any] | None, known: bool):
        wire = wire or {}
        self.parent = wire.get("parent")
        self.parent_index = wire.get("parent_index")
        self.relays = bool(wire.get("relays"))
        self.known = known  # stage() called here (else: created by an early relay request)
        self.refs: dict[int, Any] = {}
        self.failed: str | None = None
        self.changed = asyncio.Event()
        self.relayed = 0  # buckets fetched from the parent
        self.fallbacks = 0  # buckets fetched from the coordinator after the parent failed

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class RelayPoint:
    """One worker's side of the relay, on its actor's event loop.

    `begin(sync_id, wire)` when a stage call arrives; `fetch(...)` gets each bucket (from the
    parent's relay copy, else from the coordinator), verifies it and, when this worker relays,
    puts the relay copy before handing the bucket on; `copy_for(sync_id, index)` answers a
    child; `end(sync_id)` on commit or abort drops the copies.
    """

    def __init__(self, timeout_s: float, put: Callable[[Any], Awaitable[Any]]):
        self.timeout_s = timeout_s
        self._put = put  # puts a buffer into this node's object store, returns its ref
        self._syncs: collections.OrderedDict[str, _SyncCopies] = collections.OrderedDict()
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()

    def begin(self, sync_id: str, wire: dict[str, Any] | None) -> None:
        early = self._syncs.pop(sync_id, None)  # a child may have asked before this stage call
        copies = self._syncs[sync_id] = _SyncCopies(wire, known=True)
        if early is not None:
            copies.changed = early.changed
        copies.notify()
        while len(self._syncs) > _KEPT_SYNCS:
            old, dropped = self._syncs.popitem(last=False)
            dropped.failed = "a newer sync started"
            dropped.notify()
            self._remember_ended(old)

    def stats(self, sync_id: str) -> dict[str, float]:
        copies = self._syncs.get(sync_id)
        if copies is None or (copies.parent is None and not copies.relays):
            return {}
        return {"relayed_buckets": copies.relayed, "relay_fallbacks": copies.fallbacks,
                "relay_copies": len(copies.refs)}

    async def fetch(self, sync_id: str, index: int, original: Any,
                    verify: Callable[[Any], Awaitable[None]]) -> Any:
        """Bucket `index` of `sync_id`, verified: from the parent's relay copy when there is a
        parent, else (or when that fails) from `original`, the coordinator's ref."""
        copies = self._syncs.get(sync_id)
        buffer = None
        if copies is not None and copies.parent is not None:
            try:
                (ref,) = await asyncio.wait_for(copies.parent.relay_copy.remote(sync_id, index), self.timeout_s)
                buffer = await ref
                await verify(buffer)
                copies.relayed += 1
            except Exception as err:  # noqa: BLE001 - any failure: the coordinator's copy
                buffer = None
                copies.fallbacks += 1
                log.warning(json.dumps({"event": "relay_fallback", "sync": sync_id, "bucket": index,
                                        "parent": copies.parent_index, "error": f"{type(err).__name__}: {err}"[:300]}))
        if buffer is None:
            buffer = await original
            await verify(buffer)
        if copies is not None and copies.relays and copies.failed is None:
            try:
                copies.refs[index] = await self._put(buffer)
                copies.notify()
            except Exception as err:  # noqa: BLE001 - e.g. a full object store: children fall back
                self.fail(sync_id, f"could not put a relay copy: {type(err).__name__}: {err}")
        return buffer

    def fail(self, sync_id: str, why: str) -> None:
        """This worker will not relay (more of) `sync_id`: waiting children fall back now."""
        copies = self._syncs.get(sync_id)
        if copies is not None and copies.failed is None:
            copies.failed = why
            copies.notify()

    def end(self, sync_id: str) -> None:
        """Drop the relay copies of `sync_id` (its commit or abort: no child needs them)."""
        copies = self._syncs.pop(sync_id, None)
        if copies is not None:
            copies.failed = "the sync ended here"
            copies.notify()
        self._remember_ended(sync_id)

    async def copy_for(self, sync_id: str, index: int) -> Any:
        """The ref of this worker's relay copy of bucket `index`, once it is there. Raises
        RelayClosed if this worker will not hold it."""
        if sync_id in self._ended:
            raise RelayClosed(f"sync {sync_id} ended on this worker")
        copies = self._syncs.get(sync_id)
        if copies is None:
            copies = self._syncs[sync_id] = _SyncCopies(None, known=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        unknown_until = loop.time() + UNKNOWN_SYNC_GRACE_S
        while True:
            if index in copies.refs:
                return copies.refs[index]
            if copies.failed is not None:
                raise RelayClosed(f"sync {sync_id}: {copies.failed}")
            if copies.known and not copies.relays:
                raise RelayClosed(f"sync {sync_id}: this worker does not relay")
            now = loop.time()
            if not copies.known and now >= unknown_until:
                self._syncs.pop(sync_id, None)
                raise RelayClosed(f"sync {sync_id} is unknown here (this worker restarted, or never staged it)")
            if now >= deadline:
                raise RelayClosed(f"bucket {index} of sync {sync_id} did not arrive within {self.timeout_s:g}s")
            changed = copies.changed
            try:
                await asyncio.wait_for(changed.wait(), (unknown_until if not copies.known else deadline) - now)
            except TimeoutError:
                pass
            copies = self._syncs.get(sync_id, copies)

    def _remember_ended(self, sync_id: str) -> None:
        self._ended[sync_id] = None
        while len(self._ended) > 64:
            self._ended.popitem(last=False)


class RelayPlanner:
    """The coordinator's side: asks each worker for its node as soon as a sync starts (the
    answers come while the tree is flattened and checked), then plans the relay.

        planner = RelayPlanner(handles, workers, fanout)   # at the start of the sync
        ...
        relay = planner.roles()   # {worker: the stage() relay argument, or None}
    """

    def __init__(self, handles: Sequence[Any], workers: Sequence[int], fanout: int, timeout_s: float = 10.0):
        self.handles, self.workers, self.fanout, self.timeout_s = handles, list(workers), fanout, timeout_s
        self._calls: dict[Any, int] = {}
        if fanout >= 1 and len(self.workers) >= 2:  # one worker: nothing to relay through
            self._calls = {handles[w].node_id.remote(): w for w in self.workers}

    def roles(self) -> dict[int, dict[str, Any] | None]:
        import ray

        if not self._calls:
            return {w: None for w in self.workers}
        done, _ = ray.wait(list(self._calls), num_returns=len(self._calls), timeout=self.timeout_s)
        nodes: dict[int, str | None] = {w: None for w in self.workers}
        for ref in done:
            try:
                nodes[self._calls[ref]] = ray.get(ref)
            except Exception:  # noqa: BLE001 - a worker that is down fetches from the coordinator
                pass
        roles = plan_relay(nodes, ray.get_runtime_context().get_node_id(), self.fanout)
        if any(role.parent is not None for role in roles.values()):
            log.info(json.dumps({"event": "relay_plan", "parents": {w: r.parent for w, r in roles.items()}}))
        return {w: to_wire(roles[w], self.handles) for w in self.workers}
