"""Defaults are defined once: FleetConfig and EngineConfig hold them, and rollout.init,
RolloutService, the command line, the demo's client and the README's options table agree."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from rollout.coordinator.fleet import service_configs
from rollout.engine.config import EngineConfig
from rollout.fleet_config import FleetConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_option_defaults() -> dict[str, object]:
    """{option: default} from the README's options table (`a`, `b` | d1, d2 | ...)."""
    text = README.read_text()
    table = text[text.index("| option | default |"):]
    table = table[: table.index("\n\n")]
    out: dict[str, object] = {}
    for row in table.splitlines()[2:]:
        names_cell, defaults_cell = [c.strip() for c in row.strip("|").split("|")[:2]]
        names = re.findall(r"`(\w+)`", names_cell)
        defaults = [d.strip().strip("`") for d in re.split(r",\s*(?![^{]*})", defaults_cell)]
        assert len(names) == len(defaults), row
        for name, default in zip(names, defaults):
            default = re.sub(r"^(\d+) MiB$", lambda m: str(int(m.group(1)) << 20), default)
            out[name] = ast.literal_eval(default)
    return out


def test_the_readme_options_table_shows_every_config_default():
    documented = readme_option_defaults()
    defaults = {f.name: getattr(cfg, f.name) for cfg in (FleetConfig(), EngineConfig()) for f in dataclasses.fields(cfg)}
    assert sorted(documented) == sorted(defaults)
    assert {k: documented[k] for k in defaults} == defaults


def test_a_service_without_options_gets_the_configs_defaults():
    assert service_configs({}) == (FleetConfig(), EngineConfig())


def test_init_and_the_service_take_their_explicit_defaults_from_fleet_config():
    import rollout
    from rollout.coordinator.service import RolloutService

    for fn in (rollout.init, RolloutService.__init__):
        params = inspect.signature(fn).parameters
        assert params["num_workers"].default == FleetConfig.num_workers
        assert params["devices_per_worker"].default == FleetConfig.devices_per_worker


def test_an_unknown_option_is_refused_listing_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_batches'\].*max_batch"):
        service_configs({"max_batches": 4})


def test_the_generate_command_defaults_to_the_engine_config():
    from rollout.cli import build_parser

    args = build_parser().parse_args(["generate", "some/model", "hi"])
    assert (args.max_seq_len, args.dtype) == (EngineConfig.max_seq_len, EngineConfig.dtype)


def test_the_serve_command_defaults_to_the_engine_and_fleet_configs():
    from rollout.cli import build_parser

    args = build_parser().parse_args(["serve", "some/model"])
    assert (args.max_batch, args.max_seq_len, args.dtype, args.decode_steps, args.swap_policy, args.kv_layout) == (
        EngineConfig.max_batch, EngineConfig.max_seq_len, EngineConfig.dtype, EngineConfig.decode_steps,
        EngineConfig.swap_policy, EngineConfig.kv_layout,
    )
    assert (args.engine, args.accelerator) == (FleetConfig.engine, FleetConfig.accelerator)
    assert (args.page_size, args.kv_pages, args.kv_memory_fraction, args.kv_admission_ratio) == (
        EngineConfig.page_size, EngineConfig.kv_pages, EngineConfig.kv_memory_fraction, EngineConfig.kv_admission_ratio,
    )


def test_the_serve_command_takes_the_engine_backend_and_kv_layout():
    from rollout.cli import build_parser

    args = build_parser().parse_args(["serve", "some/model", "--engine", "sglang-jax", "--kv-layout", "paged"])
    assert (args.engine, args.kv_layout) == ("sglang-jax", "paged")


def test_the_serve_command_sizes_the_paged_pool():
    from rollout.cli import build_parser
    from rollout.server.cli import service_options

    argv = ["serve", "some/model", "--kv-layout", "paged", "--page-size", "32", "--kv-pages", "4096",
            "--kv-admission-ratio", "1"]
    _, engine = service_configs(service_options(build_parser().parse_args(argv)))
    assert (engine.kv_layout, engine.page_size, engine.kv_pages, engine.kv_admission_ratio) == ("paged", 32, 4096, 1.0)
    with pytest.raises(SystemExit):  # a pool size in pages or as a memory fraction, not both
        build_parser().parse_args([*argv, "--kv-memory-fraction", "0.5"])


def test_every_demo_client_option_is_a_service_option_and_unchanged_ones_keep_the_defaults():
    from trainer_stub.clients import FleetOptions

    options = FleetOptions()
    fleet, engine = service_configs(options.service_options())  # raises on a non-option
    assert (fleet.num_workers, engine.max_batch, engine.dtype) == (
        FleetConfig.num_workers, EngineConfig.max_batch, EngineConfig.dtype
    )
    assert options.engine_config() == engine
