"""What the sglang-jax backend refuses at start, and the environment it needs (msgpack >= 1)."""

from __future__ import annotations

import pytest

from rollout.engine import EngineConfig
from rollout.engine.sglang import create_engine, requirements
from rollout.testing import make_tiny_checkpoint

pytestmark = [pytest.mark.sglang, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_head_dim_not_a_multiple_of_128_is_refused(tmp_path):
    small = make_tiny_checkpoint(tmp_path / "hd32", head_dim=32)
    with pytest.raises(ValueError, match=r"head_dim=32 cannot be served by engine='sglang-jax'.*multiple of 128"):
        create_engine(small, EngineConfig(max_batch=1, max_seq_len=64, load_format="dummy"))


@pytest.mark.parametrize("policy", ["recompute", "continue"])
def test_swap_policies_it_cannot_honour_are_refused_naming_drain(ckpt_a, policy):
    with pytest.raises(ValueError, match=f"swap_policy='{policy}' is not available.*supports 'drain'"):
        create_engine(ckpt_a, EngineConfig(max_batch=1, max_seq_len=64, swap_policy=policy))


def test_python_below_3_12_is_refused_with_the_way_out():
    with pytest.raises(requirements.BackendUnavailableError, match=r"Python >= 3.12.*Python 3.11.*sglang_root.sh"):
        requirements.check_python((3, 11, 9))
    requirements.check_python((3, 13, 5))


def test_msgpack_module_is_v1_so_ray_and_manifests_work():
    """sglang-jax 0.0.2 requires msgpack-python 0.5.6, which installs the same module; the root's
    install order leaves msgpack 1.x in place (sglang-jax never imports it at run time)."""
    import msgpack
    import numpy as np

    from rollout.weights.buckets import Manifest, pack, plan_buckets, unpack
    from rollout.weights.spec import ParamSpec

    requirements.check_msgpack()
    assert msgpack.version >= (1, 0, 0)
    assert msgpack.unpackb(msgpack.packb({1: b"x"}), strict_map_key=False) == {1: b"x"}  # 1.x-only keyword
    flat = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    packed = pack(flat, plan_buckets(ParamSpec.of(flat), 1024), version=3)
    manifest = Manifest.from_bytes(packed.manifest.to_bytes())
    assert manifest.version == 3
    assert all(np.array_equal(unpack(manifest, packed.buffers)[k], v) for k, v in flat.items())


def test_ray_serialization_works_with_this_msgpack():
    import ray
    from ray._private.serialization import SerializationContext  # noqa: F401  (imports msgpack 1.x API)

    assert ray.__version__
