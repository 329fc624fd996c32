"""KvLayout: what a KV cache layout supplies to the native engine (see rollout.engine.native.kv).

Each layout module (kv/contiguous.py, kv/paged/setup.py) returns one, and `make_layout` picks the
module. Importing this module does not import jax.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollout.engine.native.runner_api import Runner
    from rollout.engine.native.scheduler import BaseScheduler
    from rollout.engine.weight_state import WeightState


@dataclass(frozen=True)
class KvLayout:
    """One layout, built for one engine: its runner, and how to build the scheduler that drives it
    (the scheduler needs the engine's lock and weight state, made after the runner)."""

    name: str
    runner: Runner
    make_scheduler: Callable[[threading.Condition, WeightState], BaseScheduler[Any]]
