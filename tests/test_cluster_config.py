"""cluster/tpu.yaml and cluster/train_on_tpu.py agree with Ray, each other and the package.

Ray's own schema validation covers the shape of the config; the tests below it pin down what the
schema cannot know: TPU chip counts per host, the example script's worker layout, how the package
gets installed, and the placeholders a user must fill. No network, no cloud calls.
"""

from __future__ import annotations

import ast
import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster" / "tpu.yaml"
EXAMPLE_SCRIPT = REPO / "cluster" / "train_on_tpu.py"
CLUSTER_README = REPO / "cluster" / "README.md"
PYPROJECT = REPO / "pyproject.toml"

# What a user must replace before `ray up`, with stand-ins that make a complete config.
PLACEHOLDERS = {
    "<YOUR_GCP_PROJECT>": "my-project-123",
    "<YOUR_GCP_REGION>": "us-central2",
    "<YOUR_GCP_ZONE>": "us-central2-b",
}

# acceleratorType is "<generation>-<n>": n counts TensorCores on generations with two per chip,
# chips on those with one. A single-host slice has at most MAX_CHIPS_PER_HOST chips.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1}
MAX_CHIPS_PER_HOST = {"v4": 4, "v5p": 4, "v5litepod": 8, "v6e": 8}
# TPU VM software versions Google documents for JAX on each generation.
JAX_RUNTIME_VERSION = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}


def total_chips(accelerator_type: str) -> int:
    """Chips in a slice: total_chips("v4-8") == 4, total_chips("v5litepod-8") == 8."""
    generation, n = accelerator_type.rsplit("-", 1)
    return int(n) // CORES_PER_CHIP[generation]


def generation_of(accelerator_type: str) -> str:
    """generation_of("v5litepod-8") == "v5litepod"."""
    return accelerator_type.rsplit("-", 1)[0]


@pytest.fixture(scope="module")
def cluster_text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def cluster(cluster_text) -> dict:
    return yaml.safe_load(cluster_text)


@pytest.fixture(scope="module")
def filled_cluster(cluster_text) -> dict:
    """The config as a user would have it after replacing the placeholders."""
    for placeholder, value in PLACEHOLDERS.items():
        cluster_text = cluster_text.replace(placeholder, value)
    return yaml.safe_load(cluster_text)


@pytest.fixture(scope="module")
def tpu_node_types(cluster) -> dict:
    types = {
        name: spec
        for name, spec in cluster["available_node_types"].items()
        if "acceleratorType" in spec["node_config"]
    }
    assert types, "cluster/tpu.yaml defines no TPU node type (node_config.acceleratorType)"
    return types


@pytest.fixture(scope="module")
def script_constants() -> dict:
    """Module-level constants of the example script, read without importing it."""
    constants = {}
    for node in ast.parse(EXAMPLE_SCRIPT.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    return constants


def test_config_passes_rays_cluster_config_validation(filled_cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config merges Ray's GCP defaults the way `ray up` does; validate_config then
    # checks the result against ray/autoscaler/ray-schema.json plus Ray's own cross-field rules.
    validate_config(prepare_config(copy.deepcopy(filled_cluster)))


def test_config_is_for_the_gcp_provider(cluster):
    assert cluster["provider"]["type"] == "gcp"


def test_head_node_is_a_cpu_vm(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert "machineType" in head["node_config"]
    assert "acceleratorType" not in head["node_config"]
    assert "TPU" not in head["resources"]


@pytest.mark.parametrize(
    "node_type, accelerator_type", [("tpu_v4_8", "v4-8"), ("tpu_v5e_8", "v5litepod-8")]
)
def test_node_types_for_v4_8_and_v5e_8_exist(tpu_node_types, node_type, accelerator_type):
    assert tpu_node_types[node_type]["node_config"]["acceleratorType"] == accelerator_type


def test_each_tpu_node_type_declares_the_chip_count_of_its_accelerator_type(tpu_node_types):
    for name, spec in tpu_node_types.items():
        accelerator_type = spec["node_config"]["acceleratorType"]
        assert spec["resources"].get("TPU") == total_chips(accelerator_type), (
            f"{name}: acceleratorType {accelerator_type} has {total_chips(accelerator_type)} "
            f"chips per host but resources declare TPU={spec['resources'].get('TPU')}"
        )


def test_chip_counts_agree_with_rays_tpu_helpers(tpu_node_types):
    tpu = pytest.importorskip("ray._private.accelerators.tpu")
    if not hasattr(tpu, "get_num_tpu_visible_chips_per_host"):
        pytest.skip("this Ray version has no get_num_tpu_visible_chips_per_host")
    for spec in tpu_node_types.values():
        accelerator_type = spec["node_config"]["acceleratorType"]
        assert tpu.get_num_tpu_visible_chips_per_host(accelerator_type) == spec["resources"]["TPU"]


def test_each_tpu_node_type_is_a_single_host_slice(tpu_node_types):
    # rollout workers do not span hosts, so the extra hosts of a multi-host slice would idle.
    for name, spec in tpu_node_types.items():
        accelerator_type = spec["node_config"]["acceleratorType"]
        per_host = MAX_CHIPS_PER_HOST[generation_of(accelerator_type)]
        assert total_chips(accelerator_type) <= per_host, f"{name}: {accelerator_type} spans hosts"


def test_each_tpu_node_type_uses_the_jax_runtime_version_of_its_generation(tpu_node_types):
    for name, spec in tpu_node_types.items():
        node_config = spec["node_config"]
        generation = generation_of(node_config["acceleratorType"])
        assert node_config["runtimeVersion"] == JAX_RUNTIME_VERSION[generation], name


def test_exactly_one_tpu_generation_is_enabled(tpu_node_types):
    # No zone offers both v4 and v5e, and a TPU request could match either type: with both
    # enabled the autoscaler could pick one the zone does not have.
    enabled = [name for name, spec in tpu_node_types.items() if spec.get("max_workers", 0) > 0]
    assert len(enabled) == 1, f"enabled TPU node types: {enabled}"


def test_example_script_worker_settings_are_module_level_constants(script_constants):
    assert isinstance(script_constants.get("NUM_WORKERS"), int)
    assert isinstance(script_constants.get("DEVICES_PER_WORKER"), int)
    assert isinstance(script_constants.get("TPU_NODE_TYPE"), str)


def test_example_script_targets_an_enabled_tpu_node_type(script_constants, tpu_node_types):
    target = script_constants["TPU_NODE_TYPE"]
    assert target in tpu_node_types
    assert tpu_node_types[target].get("max_workers", 0) > 0


def test_devices_per_worker_equals_the_tpu_count_of_the_targeted_node_type(
    script_constants, tpu_node_types
):
    # One worker owns one whole host: all its chips, tensor-parallel.
    target = tpu_node_types[script_constants["TPU_NODE_TYPE"]]
    assert script_constants["DEVICES_PER_WORKER"] == target["resources"]["TPU"]


def test_targeted_node_type_can_scale_to_num_workers(script_constants, tpu_node_types):
    target = tpu_node_types[script_constants["TPU_NODE_TYPE"]]
    assert target.get("max_workers", 0) >= script_constants["NUM_WORKERS"]


def test_tpu_and_cluster_max_workers_cover_num_workers(cluster, script_constants, tpu_node_types):
    num_workers = script_constants["NUM_WORKERS"]
    assert sum(spec.get("max_workers", 0) for spec in tpu_node_types.values()) >= num_workers
    assert cluster["max_workers"] >= num_workers


def test_file_mount_copies_this_checkout_to_the_install_path(cluster):
    # `ray up` runs from the repository root; the local side of the mount must be that root.
    local = cluster["file_mounts"]["~/rollout"]
    pyproject = tomllib.loads((REPO / local / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "rollout"


def test_worker_setup_installs_the_mounted_checkout_with_the_tpu_extra(cluster):
    installs = [
        cmd
        for cmd in cluster["worker_setup_commands"]
        if re.search(r"pip install -e \"?(~|\$HOME)/rollout\[tpu\]\"?", cmd)
    ]
    assert installs, f"no `pip install -e ~/rollout[tpu]` in {cluster['worker_setup_commands']}"


def test_head_setup_installs_the_package_and_the_gcp_api_client(cluster):
    commands = " ".join(cluster["head_setup_commands"])
    assert re.search(r"pip install -e \"?(~|\$HOME)/rollout\b", commands)
    assert "google-api-python-client" in commands  # the autoscaler on the head needs it


def test_tpu_extra_of_the_package_requires_jax_tpu():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert any(req.replace(" ", "").startswith("jax[tpu]") for req in extras["tpu"])


def test_every_node_gets_the_same_python_and_a_pinned_ray(cluster):
    # A node whose Python or Ray version differs from the head's cannot join the cluster.
    common = " ".join(cluster["setup_commands"])
    assert re.search(r"--python 3\.1[1-9]\b", common)
    assert re.search(r"ray\[default\]==\d+\.\d+\.\d+", common)


def test_start_commands_start_the_head_and_join_workers_to_it(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


def test_every_node_populates_its_object_store_once_ray_is_up(cluster):
    # not while the raylet starts (RAY_preallocate_plasma_memory): Ray's fixed 30 s start-up wait
    # is too short for a large store (rollout/local_ray.py)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster[key] if "ray start" in c]
        assert start and all(re.search(r"ray start .*&& python -m rollout\.local_ray$", c.strip()) for c in start), key
        assert not any("RAY_preallocate_plasma_memory" in c for c in cluster[key]), key


def test_config_contains_exactly_the_known_placeholders(cluster_text):
    assert set(re.findall(r"<YOUR_[A-Z_]+>", cluster_text)) == set(PLACEHOLDERS)


def test_filling_the_placeholders_leaves_none(filled_cluster):
    assert "<YOUR_" not in yaml.safe_dump(filled_cluster)


def test_each_placeholder_has_a_fill_comment_above_it(cluster_text):
    lines = cluster_text.splitlines()
    for placeholder in PLACEHOLDERS:
        value_line = re.compile(rf'\s*\w+: "{placeholder}"')
        (index,) = [i for i, line in enumerate(lines) if value_line.match(line)]
        comments_above = []
        while lines[index - 1].strip().startswith("#"):
            index -= 1
            comments_above.append(lines[index].strip())
        assert any(c.startswith("# FILL:") for c in comments_above), (
            f"{placeholder}: no '# FILL: ...' comment right above it in cluster/tpu.yaml"
        )


def test_readme_documents_each_placeholder():
    readme = CLUSTER_README.read_text()
    for placeholder in PLACEHOLDERS:
        assert placeholder in readme, f"cluster/README.md does not explain {placeholder}"


def test_readme_gives_the_launch_and_teardown_commands():
    readme = CLUSTER_README.read_text()
    for command in ("ray up cluster/tpu.yaml", "ray down cluster/tpu.yaml", "train_on_tpu.py"):
        assert command in readme
