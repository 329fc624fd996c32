"""Many hosts, on Ray's multi-node test cluster on this machine (tests/reliability/nodes_cases.py):
a head with no worker CPUs (the driver's node) and 3 nodes of 1 CPU, one worker on each.

Syncs in every form reach every node and serve what transformers computes; buckets are relayed
by the first node's worker to the others; no socket of the process tree leaves loopback; a node
lost mid-generate, mid-stage or mid-commit loses no request, and a node added back gets the
lost worker at the committed version before it serves (the seconds from join to serving are
printed). One cluster serves the module (in a child process: the session has its own Ray).
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from .nodes_cases import NEW_TOKENS, NODES, PROMPTS, MultiNodeDriver, process_tree_sockets
from hf_reference import hf_greedy

pytestmark = [pytest.mark.ray, pytest.mark.multinode]


@pytest.fixture(scope="module")
def driver(tiny_qwen3, tiny_qwen3_perturbed):
    with MultiNodeDriver({"base": tiny_qwen3, "other": tiny_qwen3_perturbed}) as d:
        yield d


@pytest.fixture(scope="module")
def checkpoints(tiny_qwen3, tiny_qwen3_perturbed):
    return {"base": tiny_qwen3, "other": tiny_qwen3_perturbed}


def transformers_greedy(path) -> list[list[int]]:
    return [hf_greedy(path, prompt, NEW_TOKENS) for prompt in PROMPTS]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n    [multinode] {line}", flush=True)


def test_each_worker_runs_on_its_own_node_and_none_on_the_head(driver):
    placement = driver.call("placement")
    nodes = list(placement["workers"].values())
    assert len(nodes) == NODES and len(set(nodes)) == NODES, placement
    assert placement["head"] not in nodes and placement["driver"] == placement["head"], placement
    assert set(nodes) | {placement["head"]} == set(placement["nodes"])


@pytest.mark.parametrize("source, checkpoint", [("pytree", "other"), ("hf_names", "base"), ("hf_dir", "other")])
def test_a_sync_reaches_every_node_with_greedy_output_equal_to_transformers(driver, checkpoints, source, checkpoint):
    before = driver.call("version")
    result = driver.call("sync_from", source=source, checkpoint=checkpoint)
    assert result["version"] == before + 1 and sorted(result["workers"]) == list(range(NODES))
    want = transformers_greedy(checkpoints[checkpoint])
    for worker, outputs in result["greedy"].items():
        assert [tokens for tokens, _ in outputs] == want, f"worker {worker}"
        assert {version for _, version in outputs} == {result["version"]}


def test_the_first_nodes_worker_relays_every_bucket_to_the_other_nodes(driver):
    result = driver.call("sync_from", source="pytree", checkpoint="base")
    seconds = result["worker_seconds"]
    first = min(seconds)  # the plan feeds worker 0's node from the coordinator's
    buckets = seconds[first]["relay_copies"]
    assert buckets > 1, seconds  # the fleet syncs in 64 KiB buckets
    for worker, stats in seconds.items():
        if worker != first:
            assert (stats["relayed_buckets"], stats["relay_fallbacks"]) == (buckets, 0), seconds


def test_when_the_relaying_worker_fails_the_others_fetch_from_the_coordinator_and_the_sync_aborts(driver):
    out = driver.call("relay_parent_fails")
    assert out.clear, f"{out.error_type}: {out.message}"
    assert out.message.count("stage failed") == 1, out.message  # only worker 0 failed
    assert out.fleet_version == out.version_before and out.worker_versions == {out.version_before}
    children = {w: s for w, s in out.details["worker_seconds"].items() if w != 0}
    assert sorted(children) == list(range(1, NODES)), out.details
    for stats in children.values():
        assert stats["relayed_buckets"] + stats["relay_fallbacks"] == out.details["buckets"], out.details
    assert sum(s["relay_fallbacks"] for s in children.values()) > 0, out.details


def test_no_socket_of_the_process_tree_leaves_loopback_while_a_sync_and_generation_run(driver, capsys):
    driver.send("sync_from", source="pytree", checkpoint="other")
    seen: dict[tuple[str, str, str], int] = {}
    processes: set[str] = set()
    while True:
        finished = driver.done(0.05)
        for s in process_tree_sockets(os.getpid()):
            processes.add(s["process"])
            for ip in (s["local"], s["remote"]):
                if ip:
                    key = (s["process"], s["status"], ip)
                    seen[key] = seen.get(key, 0) + 1
        if finished:
            break
    result = driver.result()
    assert result["version"] > 0
    assert {"raylet", "gcs_server"} <= processes, f"the check must see the cluster's processes: {sorted(processes)}"
    outside = sorted(k for k in seen if not is_loopback(k[2]))
    assert not outside, f"sockets on non-loopback addresses: {outside}"
    report(capsys, f"loopback only: {sum(seen.values())} socket observations, processes {sorted(processes)}")


def test_a_node_lost_mid_generate_loses_no_request_and_its_worker_comes_back_on_a_new_node(driver, capsys):
    out = driver.call("remove_node_mid_generate")
    assert out.details["active_before_loss"], "the node must be lost while its worker decodes"
    assert (out.answered, out.lost, out.duplicates) == (out.sent, 0, 0), out.details
    assert out.details["first_served_version"] == out.details["committed_version"] == out.fleet_version
    assert out.details["whole_again"] and out.details["same_greedy_everywhere"], out.details
    assert out.worker_versions == {out.fleet_version}
    report(capsys, f"node lost mid-generate: {out.sent} completions, none lost; join to serving "
                   f"{out.details['join_to_serving_s']} s")


def test_a_node_lost_mid_stage_aborts_the_sync_everywhere(driver, capsys):
    out = driver.call("remove_node_mid_stage")
    assert out.clear, f"{out.error_type}: {out.message} {out.details}"
    assert "was aborted on all of them" in out.message
    assert out.details["survivor_versions"] == [out.version_before], out.details
    assert out.fleet_version == out.version_before and out.worker_versions == {out.version_before}
    assert (out.lost, out.duplicates) == (0, 0), out.details
    assert out.details["first_served_version"] == out.version_before
    assert out.details["whole_again"] and out.details["same_greedy_everywhere"], out.details
    report(capsys, f"node lost mid-stage: sync aborted everywhere; join to serving {out.details['join_to_serving_s']} s")


def test_a_node_lost_mid_commit_completes_the_sync_with_the_survivors_and_its_worker_returns_on_the_new_version(
    driver, capsys
):
    out = driver.call("remove_node_mid_commit")
    assert out.clear, f"{out.error_type}: {out.message} {out.details}"
    assert out.details["survivor_versions"] == [out.version_before + 1], out.details
    assert (out.lost, out.duplicates) == (0, 0), out.details
    assert out.details["first_served_version"] == out.version_before + 1, out.details
    assert out.fleet_version == out.version_before + 1 and out.worker_versions == {out.fleet_version}
    assert out.details["whole_again"] and out.details["same_greedy_everywhere"], out.details
    report(capsys, f"node lost mid-commit: sync done by the survivors; join to serving "
                   f"{out.details['join_to_serving_s']} s, first request on version {out.details['first_served_version']}")
