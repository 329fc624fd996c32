"""Tunix drives the fleet: FleetRollout as the rollout of Tunix's RL cluster, with Tunix's own
Qwen3, trainer and GRPO learner. Skipped only when google-tunix is not installed."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("tunix") is None:
    pytest.skip("google-tunix is not installed (pip install -e '.[tunix]')", allow_module_level=True)

import jax
import optax
from flax import nnx
from tunix.rl import common
from tunix.rl import rl_cluster as rl
from tunix.rl.grpo import grpo_learner as grpo
from tunix.rl.rollout import base_rollout

import rollout
from rollout.integrations.tunix import FleetRollout, FleetTokenizer, load_tunix_qwen3, sampling_params
from rollout.weights.spec import SpecMismatchError

pytestmark = [pytest.mark.tunix, pytest.mark.ray]

PROMPTS = ["Write a number:", "Phone:", "The year is", "My PIN is"]


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """Toy verifiable reward: the fraction of a completion's characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


@pytest.fixture(scope="module")
def tiny_qwen3(ckpt_root):
    """The tiny Qwen3 with RoPE theta 1e6: Tunix's Qwen3 applies 1e6 whatever its config says."""
    from rollout.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(ckpt_root / "qwen3_tunix", "Qwen3ForCausalLM", seed=1, rope_theta=1e6)


@pytest.fixture(scope="module")
def service(ray_local, tiny_qwen3):
    # dummy weights: the Tunix actor's weights arrive by the backend's first sync
    with rollout.RolloutService(tiny_qwen3, num_workers=2, devices_per_worker=1, accelerator="cpu",
                                load_format="dummy", max_batch=16, max_seq_len=128, bucket_bytes=64 << 10) as svc:
        yield svc


@pytest.fixture(scope="module")
def mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))


def rollout_config(**overrides) -> base_rollout.RolloutConfig:
    fields = dict(max_tokens_to_generate=16, temperature=1.0, top_p=1.0, top_k=None, max_prompt_length=16,
                  return_logprobs=True)
    return base_rollout.RolloutConfig(**{**fields, **overrides})


def tunix_logps(model: nnx.Module, state, prompt_tokens, completion_tokens, pad_id: int, eos_id: int) -> np.ndarray:
    """Tunix's own recomputation: compute_per_token_logps of its Qwen3 on `state`."""
    graphdef, _ = nnx.split(model)
    return np.asarray(common.compute_per_token_logps(
        graphdef, state, prompt_tokens=jax.numpy.asarray(prompt_tokens),
        completion_tokens=jax.numpy.asarray(completion_tokens), pad_id=pad_id, eos_id=eos_id,
    ))


def padded_completions(tokens: list[np.ndarray], width: int, pad: int) -> np.ndarray:
    out = np.full((len(tokens), width), pad, np.int32)
    for row, t in enumerate(tokens):
        out[row, : len(t)] = t
    return out


def test_a_checkpoint_whose_rope_theta_tunix_would_ignore_is_refused(ckpt_root, mesh):
    from rollout.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(ckpt_root / "qwen3_theta_1e4", "Qwen3ForCausalLM", seed=1, rope_theta=1e4)
    with pytest.raises(ValueError, match="always applies RoPE with theta 1e"):
        load_tunix_qwen3(path, mesh)


def test_rollout_config_maps_to_sampling_params():
    config = rollout_config(max_tokens_to_generate=7, temperature=0.5, top_p=0.9, top_k=-1, seed=jax.random.PRNGKey(3),
                            eos_tokens=[5, 6])
    sp = sampling_params(config, [5, 6], n=4)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.n) == (7, 0.5, 0.9, 0, 4)
    assert sp.stop_token_ids == (5, 6) and sp.ignore_eos
    assert sp.seed == sampling_params(rollout_config(seed=jax.random.PRNGKey(3)), [5]).seed
    assert sp.seed != sampling_params(rollout_config(seed=jax.random.PRNGKey(4)), [5]).seed
    assert sampling_params(rollout_config(top_k=20, top_p=None), [5]).top_k == 20


def test_update_params_syncs_tunix_qwen3_and_scores_equal_tunix_logprobs(service, tiny_qwen3, mesh):
    actor = load_tunix_qwen3(tiny_qwen3, mesh)
    backend = FleetRollout(rollout_actor=actor, tokenizer=FleetTokenizer(service.tokenizer), service=service)
    assert backend.history[-1]["event"] == "tunix_sync" and backend.version == service.version
    out = backend.generate(PROMPTS, rollout_config(max_tokens_to_generate=12))
    pad, eos = backend.pad_id(), backend.eos_id()
    completions = padded_completions(out.tokens, 12, pad)
    ours = np.asarray(backend.get_per_token_logps(out.left_padded_prompt_tokens, completions))
    theirs = tunix_logps(actor, nnx.state(actor), out.left_padded_prompt_tokens, completions, pad, eos)
    mask = completions != pad
    assert mask.sum() > len(PROMPTS)
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4)
    assert np.all(ours[~mask] == 0)
    for row, logprobs in enumerate(out.logprobs):  # generate's logprobs at temperature 1 too
        np.testing.assert_allclose(logprobs, theirs[row, : len(logprobs)], atol=1e-4)


def test_generate_fills_rollout_output_as_tunix_samplers_do(service, tiny_qwen3, mesh):
    tokenizer = FleetTokenizer(service.tokenizer)
    backend = FleetRollout(rollout_actor=load_tunix_qwen3(tiny_qwen3, mesh), tokenizer=tokenizer, service=service)
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4  # GRPO's repeated prompts
    out = backend.generate(prompts, rollout_config(seed=11, max_tokens_to_generate=20))
    assert backend.history[-1] == {"event": "tunix_generate", "versions": [service.version], "prompts": 8,
                                   "requests": 2}
    assert out.left_padded_prompt_tokens.shape == (8, 16) and out.left_padded_prompt_tokens.dtype == np.int32
    for row, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        assert out.left_padded_prompt_tokens[row, -len(ids):].tolist() == ids
        assert set(out.left_padded_prompt_tokens[row, : -len(ids)].tolist()) <= {backend.pad_id()}
    assert len({tuple(t) for t in out.tokens[:4]}) > 1, "a prompt's repeats are distinct samples"
    for tokens, logprobs, text in zip(out.tokens, out.logprobs, out.text):
        assert backend.eos_id() not in tokens.tolist() and len(tokens) <= 20
        assert logprobs.shape == tokens.shape and text == tokenizer.decode(tokens.tolist())
    again = backend.generate(prompts, rollout_config(seed=11, max_tokens_to_generate=20))
    assert [t.tolist() for t in again.tokens] == [t.tolist() for t in out.tokens], "seeded: reproducible"
    long_prompt = " ".join(["word"] * 30)  # longer than max_prompt_length: the next power of two
    width = 1 << (len(tokenizer.encode(long_prompt)) - 1).bit_length()
    assert width > 16
    assert backend.generate([long_prompt], rollout_config()).left_padded_prompt_tokens.shape == (1, width)


@pytest.mark.parametrize("damage, match", [
    (lambda p: p["layers"][0]["attn"].update(extra_lora_a=np.zeros((64, 4), np.float32)), "map to no engine parameter"),
    (lambda p: p["layers"][1]["mlp"].pop("up_proj"), r"missing 1 .*layers\.1\.mlp\.up_proj\.kernel"),
    (lambda p: p["layers"][0]["attn"]["q_proj"].update(w=np.zeros((64, 128), np.float32)),
     r"layers\.0\.attn\.q_proj\.w: expected shape \(64, 4, 32\)"),
], ids=["unmapped", "missing", "misshaped"])
def test_update_params_refuses_trees_that_do_not_map_and_keeps_the_version(service, tiny_qwen3, mesh, damage, match):
    actor = load_tunix_qwen3(tiny_qwen3, mesh)
    backend = FleetRollout(rollout_actor=actor, service=service)
    version = service.version
    params = nnx.state(actor, nnx.Param).to_pure_dict()
    damage(params)
    with pytest.raises(SpecMismatchError, match=match):
        backend.update_params(params)
    assert service.version == version


def test_tunix_grpo_learner_trains_on_fleet_rollouts_of_the_previous_update(service, tiny_qwen3, mesh):
    """Tunix's RLCluster + GRPOLearner with FleetRollout: each step's rollouts come from the
    weights of the previous update (versions), and Tunix recomputing their logprobs on those
    weights gets ours (generate's and the scoring API's) within 1e-4."""

    class Recording(FleetRollout):
        def __init__(self, *args, **kwargs):
            self.synced: dict[int, nnx.State] = {}
            self.rollouts: list[tuple[list[int], base_rollout.RolloutOutput]] = []
            self.scores: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
            super().__init__(*args, **kwargs)

        def update_params(self, params, filter_types=None):
            super().update_params(params, filter_types)
            with jax.transfer_guard("allow"):
                self.synced[self.version] = jax.tree.map(np.array, params)  # what the trainer had

        def generate(self, prompts, config, **kwargs):
            out = super().generate(prompts, config, **kwargs)
            self.rollouts.append((self.history[-1]["versions"], out))
            return out

        def get_per_token_logps(self, prompt_tokens, completion_tokens, *args, **kwargs):
            out = super().get_per_token_logps(prompt_tokens, completion_tokens)
            self.scores.append((self.history[-1]["version"], np.asarray(prompt_tokens), np.asarray(completion_tokens),
                                np.asarray(out)))
            return out

    actor = load_tunix_qwen3(tiny_qwen3, mesh)
    max_tokens = 12
    config = rl.ClusterConfig(
        role_to_mesh={rl.Role.ACTOR: mesh, rl.Role.ROLLOUT: mesh, rl.Role.REFERENCE: mesh},
        rollout_engine=functools.partial(Recording, service=service),
        training_config=rl.RLTrainingConfig(actor_optimizer=optax.adam(3e-3), eval_every_n_steps=1000, max_steps=6),
        rollout_config=rollout_config(max_tokens_to_generate=max_tokens),
    )
    cluster = rl.RLCluster(actor=actor, tokenizer=FleetTokenizer(service.tokenizer), cluster_config=config)
    # num_iterations=2: Tunix asks the rollout for the old policy's logprobs (the scoring API)
    learner = grpo.GRPOLearner(cluster, grpo.GRPOConfig(num_generations=4, num_iterations=2, beta=0.0),
                               reward_fns=digit_reward)
    data = [{"prompts": np.array([PROMPTS[(2 * i) % 4], PROMPTS[(2 * i + 1) % 4]])} for i in range(3)]
    learner.train(data)

    backend = cluster.rollout
    events = [(h["event"], h.get("version", h.get("versions"))) for h in backend.history]
    syncs = [v for e, v in events if e == "tunix_sync"]
    assert len(backend.rollouts) == 3 and syncs == list(range(syncs[0], syncs[0] + 4)), events
    last_sync = None
    for event, value in events:  # every rollout and score ran on the last sync before it
        if event == "tunix_sync":
            last_sync = value
        elif event == "tunix_generate":
            assert value == [last_sync], events
        else:
            assert value == last_sync, events
    generated = [v for e, v in events if e == "tunix_generate"]
    assert generated == [[s] for s in syncs[:3]], "one rollout per update, each on the update before it"

    # The learner trained: the weights moved over its updates (a single update may not move them,
    # when every completion of each group happened to get the same reward: zero advantages).
    before, after = backend.synced[syncs[0]], backend.synced[syncs[-1]]
    assert not np.allclose(before["embedder"]["input_embedding"].value, after["embedder"]["input_embedding"].value)

    pad, eos = backend.pad_id(), backend.eos_id()
    model = cluster.actor_trainer.model
    for (versions, out), (score_version, prompt_tokens, completion_tokens, scored) in zip(backend.rollouts,
                                                                                         backend.scores):
        state = backend.synced[versions[0]]
        completions = padded_completions(out.tokens, max_tokens, pad)
        theirs = tunix_logps(model, state, out.left_padded_prompt_tokens, completions, pad, eos)
        for row, logprobs in enumerate(out.logprobs):
            np.testing.assert_allclose(logprobs, theirs[row, : len(logprobs)], atol=1e-4)
        assert score_version == versions[0]
        mask = completion_tokens != pad
        recomputed = tunix_logps(model, state, prompt_tokens, completion_tokens, pad, eos)
        np.testing.assert_allclose(scored[mask], recomputed[mask], atol=1e-4)


def test_the_demo_script_runs_tunix_grpo_and_writes_one_line_per_step(service, tmp_path, capsys):
    import json

    from rollout.integrations import tunix_demo

    assert tunix_demo.main(["--steps", "2", "--workers", "1", "--prompts-per-step", "2", "--generations", "2",
                            "--max-tokens", "6", "--out-dir", str(tmp_path)]) == 0
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[1]["rollout_version"] == [steps[0]["new_version"]]
    assert all(s["sync_s"] > 0 and 0.0 <= s["mean_reward"] <= 1.0 for s in steps)
    assert "mean reward: first" in capsys.readouterr().out
