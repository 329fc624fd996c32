"""The reliability report: every case of tests/reliability against a live fleet, as tables.

Starts a local Ray (on loopback) and a fleet of 2 workers x 2 simulated CPU devices on tiny
checkpoints made on the spot, then runs the cases defined once in tests/reliability/ (one
module per category, the same helpers the tests assert on): bad weight updates, bad generate
requests, faults (hang, kills, shutdown, garbage collection), security probes and a soak; then
the node-loss cases on a multi-node cluster of its own (tests/reliability/nodes_cases.py: a
node lost mid-generate, mid-stage and mid-commit, and added back). Prints one row per case and
a summary:

    cases tried | clear errors | requests lost | versions mixed | memory drift | restarts

    python bench/reliability_report.py              # soak: 2,000 requests from 8 clients
    python bench/reliability_report.py --quick      # soak: 400 requests from 4 clients
    python bench/reliability_report.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: 127.0.0.1 only
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short soak (400 requests, 4 clients)")
    p.add_argument("--requests", type=int, default=None, help="soak requests (default 2000, quick 400)")
    p.add_argument("--clients", type=int, default=None, help="soak client threads (default 8, quick 4)")
    p.add_argument("--json", type=Path, default=None, help="also write every outcome here as JSON")
    p.add_argument("--skip-nodes", action="store_true", help="skip the multi-node cases (a cluster of 4 raylets)")
    return p.parse_args(argv)


def row(category: str, out: Any, ok: bool) -> dict[str, Any]:
    return {
        "category": category,
        "case": out.case,
        "error": out.error_type.__name__.replace("RayTaskError(", "").rstrip(")") if out.error_type else "-",
        "clear": out.clear,
        "lost": out.lost,
        "duplicated": out.duplicates,
        "versions_mixed": out.versions_mixed,
        "restarts": out.restarts,
        "ok": ok,
        "seconds": round(out.seconds, 2),
        "message": " ".join((out.details.get("error") or out.message).split())[:200],
        "details": {k: v for k, v in out.details.items() if k not in ("error", "good_tokens")},
    }


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import ray
    from reliability import bad_requests, bad_updates, faults, harness, security, soak

    import rollout
    from rollout.local_ray import start_local_ray
    from rollout.testing import make_tiny_checkpoint

    requests = args.requests or (400 if args.quick else 2000)
    clients = args.clients or (4 if args.quick else 8)
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="rollout-reliability-"))
    ckpt = make_tiny_checkpoint(tmp / "qwen3", "Qwen3ForCausalLM", seed=1)
    other_ckpt = make_tiny_checkpoint(tmp / "qwen3_b", "Qwen3ForCausalLM", seed=2)
    params, other = harness.engine_params(ckpt), harness.engine_params(other_ckpt)
    start_local_ray(num_cpus=4, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    try:
        svc = rollout.RolloutService(ckpt, **harness.FLEET)
        try:
            svc.sync_weights(params)
            baseline = harness.fingerprint(svc)
            for case in bad_updates.BAD_UPDATES:
                out = bad_updates.try_bad_update(svc, case, params)
                unchanged = out.fingerprint == baseline and out.worker_versions == {out.version_before}
                rows.append(row("bad updates", out, out.clear and unchanged and out.lost == 0))
                progress(rows[-1])

            good = [c.token_ids for c in svc.generate(*bad_requests.GOOD_REQUEST, timeout=180)]
            for case in bad_requests.BAD_REQUESTS:
                out = bad_requests.try_bad_request(svc, case)
                ok = out.clear and out.details["queued"] == 0 and out.details["good_tokens"] == good
                rows.append(row("bad requests", out, ok and out.lost == 0))
                progress(rows[-1])

            for fault in (
                lambda: faults.hang_in_stage(svc, other),
                lambda: faults.feed_before_stage(svc, other),
                lambda: faults.kill_worker_mid_generate(svc),
                lambda: faults.kill_worker_mid_sync(svc, params, point="stage"),
                lambda: faults.kill_worker_mid_sync(svc, other, point="commit"),
            ):
                out = fault()
                ok = out.clear and out.lost == 0 and out.duplicates == 0 and out.worker_versions == {out.fleet_version}
                rows.append(row("faults", out, ok))
                progress(rows[-1])
            for case in (faults.shutdown_while_generating, faults.collect_while_generating):
                out = case(lambda: rollout.RolloutService(ckpt, **harness.SMALL_FLEET))
                ok = out.clear and out.details["released"] and out.details.get("collected", True)
                rows.append(row("faults", out, ok))
                progress(rows[-1])

            marker = tmp / "pwned"
            for probe in (
                lambda: security.stage_pickle_as_manifest(svc, marker / "manifest"),
                lambda: security.stage_pickle_as_bucket(svc, params, marker / "bucket"),
                lambda: security.stage_bit_flipped_bucket(svc, params),
                lambda: security.stage_without_checksums(svc, params),
            ):
                out = probe()
                rows.append(row("security", out, out.clear and not out.details.get("executed", False)))
                progress(rows[-1])
            sockets = security.listening_sockets_of_owned_ray(ckpt)
            exposed = sorted({f"{s['process']}@{s['ip']}" for s in sockets if not security.is_loopback(s["ip"])})
            loopback = harness.Outcome("loopback_only", "security", clear=not exposed,
                                     message=f"{len(sockets)} listening sockets; not on loopback: {exposed}")
            rows.append(row("security", loopback, not exposed))
            progress(rows[-1])

            result = soak.soak(svc, [params, other], requests=requests, clients=clients)
        finally:
            svc.shutdown()
    finally:
        ray.shutdown()
    if not args.skip_nodes:
        from reliability import nodes_cases

        for out in nodes_cases.run_node_cases({"base": ckpt, "other": other_ckpt}):
            rows.append(row("nodes", out, nodes_cases.node_ok(out)))
            progress(rows[-1])
    soaked = {
        "requests": result.requests, "clients": result.clients, "seconds": round(result.seconds, 1),
        "requests_per_s": round(result.rate, 1), "syncs": len(result.syncs), "sync_errors": result.sync_errors,
        "lost": result.lost, "duplicated": result.duplicates, "client_errors": result.client_errors[:5],
        "out_of_range": len(result.out_of_range), "unknown_versions": sorted(result.unknown_versions),
        "mixed_completions": result.mixed_completions, "worker_versions": sorted(result.worker_versions),
        "rss_before_mib": {w: round(b / 2**20, 1) for w, b in result.rss_before.items()},
        "rss_after_mib": {w: round(b / 2**20, 1) for w, b in result.rss_after.items()},
        "drift_mib": {w: round(d, 1) for w, d in result.drift_mib.items()}, "restarts": result.restarts,
        "compiled_before": result.compiled_before, "compiled_after": result.compiled_after,
    }
    return rows, soaked


def progress(r: dict[str, Any]) -> None:
    print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['category']:<12} {r['case']:<32} {r['seconds']:>6.1f}s", file=sys.stderr, flush=True)


def print_tables(rows: list[dict[str, Any]], soak: dict[str, Any]) -> None:
    from reliability.soak import RSS_TOLERANCE_MIB

    print(f"{'category':<13}{'case':<33}{'error':<22}{'clear':<7}{'lost':>5}{'dup':>5}{'mixed':>7}{'restarts':>10}  ok")
    for r in rows:
        print(f"{r['category']:<13}{r['case']:<33}{r['error'][:21]:<22}{'yes' if r['clear'] else 'NO':<7}"
              f"{r['lost']:>5}{r['duplicated']:>5}{'yes' if r['versions_mixed'] else 'no':>7}{r['restarts']:>10}"
              f"  {'ok' if r['ok'] else 'FAIL'}")
    print()
    print("messages:")
    for r in rows:
        joined = r["details"].get("join_to_serving_s")
        print(f"  {r['case']}: {r['message']}" + (f" (node added back: serving after {joined} s)" if joined else ""))
        if not r["ok"]:
            print(f"    FAILED; details: {r['details']}")
    print()
    drift = max(soak["drift_mib"].values(), default=0.0)
    print(f"{'':<14}{'cases tried':>12}{'clear errors':>14}{'requests lost':>15}{'versions mixed':>16}"
          f"{'memory drift':>14}{'restarts':>10}{'failed':>8}")
    for category in dict.fromkeys(r["category"] for r in rows):
        group = [r for r in rows if r["category"] == category]
        print(f"{category:<14}{len(group):>12}{sum(r['clear'] for r in group):>8}/{len(group):<5}"
              f"{sum(r['lost'] for r in group):>15}{sum(r['versions_mixed'] for r in group):>16}{'-':>14}"
              f"{sum(r['restarts'] for r in group):>10}{sum(not r['ok'] for r in group):>8}")
    soak_mixed = soak["out_of_range"] + soak["mixed_completions"] + len(soak["unknown_versions"])
    soak_failed = int(bool(soak["lost"] or soak["duplicated"] or soak_mixed or soak["restarts"]
                           or soak["sync_errors"] or drift >= RSS_TOLERANCE_MIB))
    print(f"{'soak':<14}{soak['requests']:>12}{'-':>14}{soak['lost']:>15}{soak_mixed:>16}"
          f"{f'{drift:+.1f} MiB':>14}{soak['restarts']:>10}{soak_failed:>8}")
    print()
    print(f"soak: {soak['requests']} requests from {soak['clients']} clients in {soak['seconds']} s "
          f"({soak['requests_per_s']}/s), {soak['syncs']} syncs, duplicated {soak['duplicated']}, "
          f"versions outside their window {soak['out_of_range']}, fleet ends on {soak['worker_versions']}; "
          f"worker RSS {soak['rss_before_mib']} -> {soak['rss_after_mib']} MiB "
          f"(drift {soak['drift_mib']}, tolerance {RSS_TOLERANCE_MIB} MiB); programs compiled per worker "
          f"{soak['compiled_before']} -> {soak['compiled_after']}")
    if soak["client_errors"] or soak["sync_errors"]:
        print(f"soak errors: {soak['client_errors']} {soak['sync_errors']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    rows, soak = run(args)
    print_tables(rows, soak)
    print(f"\n{len(rows) + 1} cases in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"cases": rows, "soak": soak}, indent=2, default=str))
    failed = sum(not r["ok"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
