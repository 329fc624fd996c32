"""The relay plan (rollout/relay.py): who fetches a sync's buckets from whom across nodes.

Plain Python: the multi-node behaviour itself is tested in tests/reliability/test_nodes.py.
"""

from __future__ import annotations

import pytest

import rollout
from rollout.relay import RelayRole, plan_relay


def nodes_of(roles: dict[int, RelayRole], worker_nodes: dict[int, str]) -> dict[str, set[str | None]]:
    """Each node's parent nodes (None: the coordinator's copy)."""
    out: dict[str, set[str | None]] = {}
    for worker, role in roles.items():
        out.setdefault(worker_nodes[worker], set()).add(None if role.parent is None else worker_nodes[role.parent])
    return out


@pytest.mark.parametrize("nodes", [2, 3, 4, 7, 16])
@pytest.mark.parametrize("fanout", [1, 2, 3])
def test_the_coordinators_node_feeds_exactly_one_node_and_every_node_feeds_at_most_fanout(nodes, fanout):
    worker_nodes = {w: f"n{w}" for w in range(nodes)}
    roles = plan_relay(worker_nodes, "head", fanout)
    parents = nodes_of(roles, worker_nodes)
    assert [n for n, p in parents.items() if p == {None}] == ["n0"]
    fed_by: dict[str, int] = {}
    for node, (parent,) in ((n, tuple(p)) for n, p in parents.items()):
        if parent is not None:
            fed_by[parent] = fed_by.get(parent, 0) + 1
    assert max(fed_by.values()) <= fanout
    assert {w for w, r in roles.items() if r.relays} == {int(n[1:]) for n in fed_by}


def test_every_node_is_reached_from_the_coordinator_without_cycles():
    worker_nodes = {w: f"n{w}" for w in range(9)}
    roles = plan_relay(worker_nodes, "head", fanout=2)
    for worker in roles:
        seen, hop = set(), worker
        while roles[hop].parent is not None:
            assert hop not in seen
            seen.add(hop)
            hop = roles[hop].parent
        assert worker_nodes[hop] == "n0"


def test_workers_of_one_node_share_its_source_and_only_its_first_worker_relays():
    worker_nodes = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}
    roles = plan_relay(worker_nodes, "head", fanout=2)
    assert roles[0] == RelayRole(None, True) and roles[1] == RelayRole(None, False)
    assert roles[2].parent == roles[3].parent == roles[4].parent == roles[5].parent == 0
    assert not any(roles[w].relays for w in (1, 2, 3, 4, 5))


def test_workers_on_the_coordinators_node_or_an_unknown_one_read_the_coordinators_copy():
    roles = plan_relay({0: "head", 1: None, 2: "a", 3: "b"}, "head", fanout=2)
    assert roles[0] == roles[1] == RelayRole(None, False)
    assert roles[2] == RelayRole(None, True) and roles[3] == RelayRole(2, False)


def test_fanout_zero_turns_the_relay_off():
    roles = plan_relay({w: f"n{w}" for w in range(4)}, "head", fanout=0)
    assert set(roles.values()) == {RelayRole(None, False)}


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_relay_fanout_must_be_a_non_negative_integer(value):
    with pytest.raises(ValueError, match="relay_fanout"):
        rollout.FleetConfig(relay_fanout=value)
