"""Relay: buckets travel coordinator -> one node -> the others, so the coordinator's node sends
about one model per sync whatever the number of worker nodes.

Without it every worker fetches every bucket from the coordinator's object store, and the
coordinator's node sends (worker nodes x model) bytes per sync. Ray's object manager pulls an
object from a node chosen at random among those that hold a copy, and the coordinator's node
always holds one, so a second `ray.get` of the same ref elsewhere still comes from the
coordinator part of the time (gets one after the other: 1 + 1/2 + 1/3 ... copies from it on
average, 2 of 3 in a test here; gets at once: N copies, before any node holds a whole object;
`rollout bench fanout` measures 2.8 of 4 for a pipelined sync). Ray offers no way to pick the
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

The coordinator (rollout.coordinator.sync) asks the workers' nodes, plans, and sends each worker its
RelayRole (rollout.protocol) with its stage call. On the worker, `RelayPoint` is the fetch path
of rollout.worker.host.WorkerHost: it fetches each bucket, keeps the worker's relay copies per
sync and answers its children's `relay_copy` calls. No Ray import: the object store and the
parent's remote call are injected (rollout.worker.actor), so the logic is tested without Ray.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from rollout.protocol import ObjectRef, RelayRole

log = logging.getLogger("rollout.relay")

# How long a parent waits for a sync it has not heard of (its stage call may still be on the
# way) before it says it holds nothing: a restarted parent never hears of it.
UNKNOWN_SYNC_GRACE_S = 5.0
_KEPT_SYNCS = 2  # relay copies of the last syncs kept until their commit or abort


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


class RelayClosed(RuntimeError):
    """This worker holds no relay copy of the bucket asked for (the sync ended here, failed, or
    was never staged here); the asking worker fetches from the coordinator instead."""


class _SyncCopies:
    """One sync's relay state on one worker."""

    def __init__(self, role: RelayRole | None, known: bool, can_relay: bool):
        role = role or RelayRole()
        self.parent = role.parent
        self.parent_calls = role.parent_calls if role.parent is not None else None
        self.relays = role.relays and can_relay
        self.known = known  # its stage call came here (else: made by a child's early request)
        self.refs: dict[int, ObjectRef] = {}  # bucket -> this worker's relay copy
        self.failed: str | None = None  # why this worker will not relay (more of) the sync
        self.changed = asyncio.Event()
        self.relayed = 0  # buckets fetched from the parent's relay copies
        self.fallbacks = 0  # buckets fetched from the coordinator after the parent's copy failed
        # Why the parent's copies are no longer asked for: after one failure every later bucket
        # of the sync comes from the coordinator (a restarted parent would make each ask wait
        # out the unknown-sync grace).
        self.parent_failed: str | None = None

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class RelayPoint:
    """One worker's side of the relay, on its event loop: the fetch path of its WorkerHost.

        relay = RelayPoint(fetch, put=put, copy_from=copy_from, timeout_s=600)
        relay.begin(sync_id, role)                          # the stage call came, with its role
        buffer = await relay.fetch(sync_id, index, ref, verify)   # each bucket, verified
        ref = await relay.copy_for(sync_id, index)          # a child asks for a relay copy
        relay.end(sync_id)                                  # commit or abort: copies dropped

    `fetch(ref)` resolves an object-store ref to its bucket; `put(buffer)` puts a relay copy
    into this node's object store and returns its ref (None: this worker never relays);
    `copy_from(parent_calls, sync_id, index)` asks a parent worker for its relay copy's ref
    (None: this worker always fetches from the coordinator).
    """

    def __init__(
        self,
        fetch: Callable[[ObjectRef], Awaitable[Any]],
        *,
        put: Callable[[Any], Awaitable[ObjectRef]] | None = None,
        copy_from: Callable[[Any, str, int], Awaitable[ObjectRef]] | None = None,
        timeout_s: float = 600.0,
    ):
        self.timeout_s = timeout_s
        self._fetch = fetch
        self._put = put
        self._copy_from = copy_from
        self._syncs: collections.OrderedDict[str, _SyncCopies] = collections.OrderedDict()
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()

    def begin(self, sync_id: str, role: RelayRole | None) -> None:
        """The stage call of `sync_id` came here with this worker's `role`."""
        if self._copy_from is None and role is not None:
            role = RelayRole(None, role.relays)
        early = self._syncs.pop(sync_id, None)  # a child may have asked before this stage call
        copies = self._syncs[sync_id] = _SyncCopies(role, known=True, can_relay=self._put is not None)
        if early is not None:
            copies.changed = early.changed
        copies.notify()
        while len(self._syncs) > _KEPT_SYNCS:  # bounded when a commit or abort never comes
            old, dropped = self._syncs.popitem(last=False)
            dropped.failed = "a newer sync started"
            dropped.refs.clear()
            dropped.notify()
            self._remember_ended(old)

    def stats(self, sync_id: str) -> dict[str, int]:
        """The StageReport fields of `sync_id` on this worker (rollout.protocol)."""
        copies = self._syncs.get(sync_id)
        if copies is None:
            return {}
        return {"relayed_buckets": copies.relayed, "relay_fallbacks": copies.fallbacks,
                "relay_copies": len(copies.refs)}

    def copies_held(self) -> int:
        """Relay copies this worker holds now, over all syncs."""
        return sum(len(c.refs) for c in self._syncs.values())

    async def fetch(
        self, sync_id: str, index: int, original: ObjectRef, verify: Callable[[Any], Awaitable[None]]
    ) -> Any:
        """Bucket `index` of `sync_id`, verified by `verify` (the coordinator's checksum): from
        the parent's relay copy when there is a parent, else (or when that fails in any way)
        from `original`, the coordinator's ref. A relaying worker then puts its relay copy."""
        copies = self._syncs.get(sync_id)
        buffer = None
        if (
            copies is not None
            and copies.parent_calls is not None
            and copies.parent_failed is None
            and self._copy_from is not None
        ):
            try:
                ref = await asyncio.wait_for(self._copy_from(copies.parent_calls, sync_id, index), self.timeout_s)
                buffer = await self._fetch(ref)
                await verify(buffer)
                copies.relayed += 1
            except Exception as err:  # noqa: BLE001 - any failure: the coordinator's copy
                buffer = None
                copies.fallbacks += 1
                copies.parent_failed = f"{type(err).__name__}: {err}"[:300]
                log.warning(json.dumps({"event": "relay_fallback", "sync": sync_id, "bucket": index,
                                        "parent": copies.parent, "error": f"{type(err).__name__}: {err}"[:300]}))
        elif copies is not None and copies.parent_calls is not None and copies.parent_failed is not None:
            copies.fallbacks += 1  # the parent failed an earlier bucket: not asked again
        if buffer is None:
            buffer = await self._fetch(original)
            await verify(buffer)
        if copies is not None and copies.relays and copies.failed is None and self._put is not None:
            try:
                ref = await self._put(buffer)
                if copies.failed is None:  # not ended while the put ran
                    copies.refs[index] = ref
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
            copies.refs.clear()
            copies.notify()
        self._remember_ended(sync_id)

    async def copy_for(self, sync_id: str, index: int) -> ObjectRef:
        """The ref of this worker's relay copy of bucket `index`, once it is there. Raises
        RelayClosed if this worker will not hold it (then at once, or after
        UNKNOWN_SYNC_GRACE_S when this worker never heard of the sync)."""
        if sync_id in self._ended:
            raise RelayClosed(f"sync {sync_id} ended on this worker")
        copies = self._syncs.get(sync_id)
        if copies is None:
            copies = self._syncs[sync_id] = _SyncCopies(None, known=False, can_relay=False)
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
