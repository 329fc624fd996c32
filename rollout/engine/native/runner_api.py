"""What the engine, its weight state and its scheduler need from a runner, whatever its KV layout.

Both runners (`rollout.engine.native.runner.ModelRunner`, contiguous slots, and
`rollout.engine.native.kv.paged.runner.PagedRunner`, a page pool) satisfy `Runner` structurally. Prefill and
decode are not part of it: their arguments are layout-specific (slots vs page tables), so only
each layout's own scheduler calls them, typed against its own runner class.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
from jax.sharding import NamedSharding

from rollout.engine.native.runner import Params
from rollout.engine.weight_state import SwapTarget


class Runner(SwapTarget[Params], Protocol):
    """The weight state's swap target (params, derived, derive, set_params), and more."""

    @property
    def param_shardings(self) -> dict[str, NamedSharding]: ...

    def place(self, path: str, array: Any) -> jax.Array:
        """One host array onto the devices with the engine's sharding for `path`."""
        ...

    def decode_batch(self, active: int) -> int:
        """Rows a decode call runs for `active` sequences."""
        ...

    def compiled_count(self) -> int:
        """Executables compiled so far."""
        ...
