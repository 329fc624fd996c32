"""The native JAX engine: slot-based continuous batching with versioned, atomic weight swaps.

`Engine` is the facade; each idea lives in its own module:

    intake.py        prompts -> validated Requests (seed, stop ids, one Sequence per sample)
    scheduler.py     the scheduler thread: cancel, swap, admit + prefill, decode; the queue
    slots.py         the loop state: the sequence, pending token, position and sampler row per slot
    sequence.py      Request / Sequence: what each sample produced; its Completion
    text.py          a sequence's text: incremental detokenization, stop strings
    runner.py        the jitted prefill and multi-step decode, the KV cache, the serving leaves
    sampling.py      per-slot sampling rows and the on-device sampler

Shared with the sglang-jax backend, in `rollout.engine`: `weight_state` (versions: stage, one path
for trees and checkpoints; commit, abort; the runner is its swap target) and `staging` (weights
onto the devices: tree, checkpoint, dummy; validated and owned).

The KV cache layout is a plug-in (`kv/`, chosen by `kv.make_layout` from `config.kv_layout`): it
supplies the runner and the scheduler; contiguous slots by default, or a paged pool
(PagedRunner, PagedScheduler: admission by pages, preemption).

Threads and the lock. Callers submit, cancel, stage, commit, abort and read status from any
thread; one scheduler thread runs the model. The engine has one lock (a Condition), which guards:
the waiting queue, the cancelled set, slot occupancy (`SlotTable.sequences` and each sequence's
`slot`), the weight state (staged copy, pending swap, committed and serving versions, swaps),
and the scheduler's closed flag and error; waiters on it are the scheduler (work to do) and
`commit(wait=True)` (the swap applied). The scheduler thread alone writes everything else it
touches: the runner (KV cache, serving leaves), the slots' pending tokens, positions and cached
sampler rows, the running sequences' tokens and text, and the counters tokens_generated and
requests_finished, which other threads read without the lock (a step stale at worst). Once the
thread has stopped, `shutdown` fails and releases what it left. Staging builds its copy without
the lock, so serving goes on meanwhile; versions read without the lock are at worst stale.
Each request's future has a small lock of its own (`RequestFuture.cancel_lock`): the scheduler
accepts the request's tokens under it and `cancel` claims the request under it, so a cancel and
the request's last token never both win.

Once `commit` returns, no request is admitted under an older version.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Self

import jax

from rollout.engine.config import SWAP_POLICIES, EngineConfig
from rollout.engine.native.intake import RequestIntake
from rollout.engine.native.kv import make_layout
from rollout.engine.native.lora import ResidentBase, merge_adapter
from rollout.engine.native.runner import Params
from rollout.engine.native.runner_api import Runner
from rollout.engine.native.scheduler import BaseScheduler
from rollout.engine.native.scoring import Scorer
from rollout.engine.quantized import Quantizer, check_quantization
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.staging import StagedWeights, dummy_params, load_params, place_params
from rollout.engine.structured import ConstraintCompiler
from rollout.engine.types import Completion, WeightSyncError
from rollout.engine.weight_state import WeightState, WeightVersions
from rollout.models import invariant
from rollout.models.bind import ModelDef
from rollout.models.config import ModelConfig
from rollout.models.sharding import make_mesh
from rollout.prompts import Prompt, PromptValidator
from rollout.scores import Scores, check_hidden_layers, check_routes, check_temperature, encode_pairs
from rollout.tokenizer import Tokenizer
from rollout.weights.loader import resolve_checkpoint
from rollout.weights.lora import adapter_factors
from rollout.weights.spec import ParamSpec


class Engine(WeightVersions):
    """One engine on one device mesh. Construct it, `submit`/`generate`, `stage`/`commit`."""

    def __init__(
        self,
        model: str | os.PathLike[str],  # what resolve_checkpoint takes
        config: EngineConfig = EngineConfig(),
        devices: Sequence[jax.Device] | None = None,
        *,
        progress: bool = False,
    ):
        self.config = config
        self.checkpoint = resolve_checkpoint(model)
        self.model_config = ModelConfig.from_pretrained(self.checkpoint)
        self.tokenizer = Tokenizer.from_pretrained(self.checkpoint)
        self.eos_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.model_def = ModelDef.create(self.model_config, config.dtype)
        if config.batch_invariant:
            invariant.check_supported(self.model_config)
        self.mesh = make_mesh(devices)
        check_quantization(config.quantization, self.model_def, list(self.mesh.devices.flat))  # before loading
        layout = make_layout(self.model_def, self.mesh, config)  # contiguous or paged: see kv/
        self.runner: Runner = layout.runner  # what the engine and its weight state use of either
        # quantization: every placed leaf (load, sync) and derived head copy is quantized on the
        # devices after validation (rollout.engine.quantized); None: placed as they are
        self._quantizer = (
            Quantizer(config.quantization, self.model_def, self.param_shardings) if config.quantization else None
        )
        if config.load_format == "dummy":
            initial = dummy_params(self.spec, self.param_shardings)
            initial = self._quantizer.tree(initial) if self._quantizer else initial
        else:
            initial = self._load(self.checkpoint, progress=progress)
        self.runner.set_params(initial, self._derive(initial) if self._quantizer else None)
        self._intake = RequestIntake(
            PromptValidator(self.model_config, self.tokenizer, config), self.tokenizer, self.eos_ids, config.seed,
            ConstraintCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_ids),
        )
        self._lock = threading.Condition()  # the engine's one lock: see the module docstring
        self._base = ResidentBase(self.current_params(), self.runner.derived)  # what adapters merge onto (lora.py)
        # the runner is the weights' swap target; `commit(wait=True)` gives up once the scheduler stops
        self._weights: WeightState[Params] = WeightState(
            self._lock, self.runner, stopped=lambda: self._scheduler.stopped
        )
        self._scheduler: BaseScheduler[Any] = layout.make_scheduler(self._lock, self._weights)

    # -- weights ------------------------------------------------------------------------------

    @property
    def spec(self) -> ParamSpec:
        """Paths, shapes and dtypes of the engine's parameters."""
        return self.model_def.spec

    @property
    def param_shardings(self) -> dict[str, jax.sharding.NamedSharding]:
        return self.runner.param_shardings

    def current_params(self) -> dict[str, jax.Array]:
        """The serving parameters (device arrays; do not mutate)."""
        params = self.runner.params
        assert params is not None, "set_params() before serving"  # loaded in __init__
        return dict(params)

    def stage(self, version: int, params: Any, *, finite_checked: bool = False) -> StagedWeights[Params]:
        """Validate and place `params` as `version` beside the serving weights.

        Raises SpecMismatchError / NonFiniteWeightsError / WeightSyncError; on any error the
        engine's weights, version and outputs are unchanged. A newer stage replaces an older one.
        `finite_checked=True` skips the finiteness pass: only for values already counted finite
        (a worker staging checksum-verified buckets of a packer that counted them).
        """
        self._scheduler.check_open()
        staged = self._weights.stage(
            version,
            lambda: place_params(params, self.spec, self._place, finite_checked=finite_checked),
            derive=self._derive if self._quantizer else None,
        )
        self._base.staged_full(version, staged.params, staged.derived)
        return staged

    def stage_checkpoint(self, version: int, model: str | Path) -> StagedWeights[Params]:
        """Stage the weights of an HF checkpoint (local directory or repo id) as `version`.

        The safetensors are read one tensor at a time straight onto the devices; the
        checkpoint must describe the same model (config shapes) as the one being served.
        """
        self._scheduler.check_open()
        staged = self._weights.stage(
            version, lambda: self._load(resolve_checkpoint(model)), derive=self._derive if self._quantizer else None
        )
        self._base.staged_full(version, staged.params, staged.derived)
        return staged

    def stage_adapter(self, version: int, adapter: Any, *, finite_checked: bool = False) -> StagedWeights:
        """Stage a LoRA adapter as `version`: the resident base with the adapter merged in
        (rollout.engine.native.lora), beside the serving weights; committed like any update.

        `adapter`: a rollout.weights.lora.LoraAdapter (PEFT names) or LoraFactors (engine
        paths, as a sync delivers them). Raises LoraAdapterError / WeightSyncError; on any error
        the engine's weights, version and outputs are unchanged.
        """
        self._scheduler.check_open()
        if self._quantizer is not None:
            raise WeightSyncError(
                f"cannot stage a LoRA adapter into an engine with quantization={self.config.quantization!r}: "
                "adapters merge into full-precision kernels; sync the merged full weights instead "
                "(they are re-quantized), or serve without quantization"
            )
        factors = adapter_factors(adapter, self.spec)
        base, derived = self._base.current()
        staged = self._weights.stage(
            version,
            lambda: merge_adapter(base, factors.factors, factors.config, self.spec, self.mesh, finite_checked=finite_checked),
            derive=lambda merged: derived,  # from the embedding, which adapters leave as it is
        )
        self._base.staged_adapter(version)
        return staged

    @property
    def base_version(self) -> int:
        """The version of the full update adapters are merged onto (0: the weights loaded at start)."""
        return self._base.version

    def _place(self, path: str, host: Any) -> Any:
        """The runner's `place`, then (with quantization) the leaf quantized on its devices."""
        placed = self.runner.place(path, host)
        return placed if self._quantizer is None else self._quantizer.quantize_placed(path, placed)

    def _derive(self, params: Params) -> dict[str, Any]:
        """The runner's serving-only leaves, with (quantization) its head copy quantized."""
        derived = self.runner.derive(params)
        return derived if self._quantizer is None else self._quantizer.quantize_derived(derived)

    def _load(self, directory: Path, *, progress: bool = False) -> dict[str, jax.Array]:
        return load_params(directory, self.spec, self._place, progress=progress)

    def commit(self, version: int, policy: str | None = None, *, wait: bool = False, timeout: float | None = None) -> int:
        """Swap in the staged `version` at the next step boundary allowed by `policy`.

        After this returns, no request is admitted under an older version. With `wait`, block
        until the swap is applied. Committing the current version again is a no-op (retries).
        """
        policy = policy or self.config.swap_policy
        if policy not in SWAP_POLICIES:
            raise ValueError(f"policy={policy!r}: expected one of {SWAP_POLICIES}")
        self._scheduler.check_open()
        version = self._weights.commit(version, policy, wait=wait, timeout=timeout)
        self._base.committed(version)
        return version

    def abort(self, version: int | None = None) -> bool:
        """Drop the staged copy (of `version`, or whatever is staged). True if one was dropped."""
        dropped = self._weights.abort(version)
        if dropped:
            self._base.aborted(version)
        return dropped

    # -- requests -----------------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        sampling: SamplingParams = SamplingParams(),
        *,
        prompt_index: int = 0,
        return_logprobs: bool = True,
        sink: Any = None,
    ) -> Future[list[Completion]]:
        """Queue one prompt; the future yields its n completions. Bad requests raise here.
        `sink` (a rollout.engine.streaming.TokenSink) also receives each sample's tokens as the
        scheduler accepts them; `stream_request` in that module is the async way to use it."""
        request = self._intake.request(
            prompt, sampling, prompt_index=prompt_index, return_logprobs=return_logprobs, sink=sink
        )
        self._scheduler.submit([request])
        return request.future

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        return_logprobs: bool = True,
        timeout: float | None = None,
        return_routed_experts: bool = False,
    ) -> list[Completion]:
        """Generate for every prompt; completions ordered by (prompt_index, sample_index).
        Every prompt is validated before any is queued. `return_routed_experts=True` is
        `sampling.return_routed_experts` (see Completion.routed_experts; MoE models only)."""
        if return_routed_experts:
            sampling = dataclasses.replace(sampling, return_routed_experts=True)
        requests = self._intake.requests(prompts, sampling, return_logprobs=return_logprobs)
        self._scheduler.submit(requests)
        return [c for r in requests for c in r.future.result(timeout)]

    def cancel(self, future: Future[list[Completion]]) -> bool:
        """Stop a submitted request. True if it is cancelled: no token of it is accepted after
        this returns, and its unfinished samples end with finish_reason "abort" at the next step
        boundary, keeping the tokens they had (samples that had finished keep their own reason).
        False if it had finished already (every sample: its normal result comes, even if the
        future has not resolved yet), or failed, or is not a request of this engine."""
        return self._scheduler.cancel(future)

    # -- scoring (rollout.engine.native.scoring) -------------------------------------------------------

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Any],
        *,
        temperature: float = 1.0,
        routed_experts: Sequence[Any] | None = None,
        return_hidden_states: Sequence[int] | None = None,
    ) -> Scores:
        """Per-token logprobs of `completions[i]` (token ids) after `prompts[i]`, teacher-forced,
        all on one weight version: a `rollout.Scores` (logprobs, weight_version). Every pair is
        validated (as generate validates prompts) before one consistent version is taken.

        `routed_experts[i]` (MoE models): the experts of every fed position of pair i, as
        `Completion.routed_experts` gives them ((prompt + completion tokens - 1, MoE layers,
        top_k)); each MoE layer then uses those experts instead of its router's choice (routing
        replay), so the logprobs are those of the routes generation took.

        `return_hidden_states=[layer indices]` (dense models): `Scores.hidden_states` holds, per
        pair, the residual stream at those layers (0: the embeddings, i: after layer i,
        num_layers: after the final norm, as transformers' output_hidden_states) at every
        position of prompt + completion, from the same forward as the logprobs."""
        prompt_ids, completion_ids = encode_pairs(
            self._intake.encode, prompts, completions,
            vocab_size=self.model_config.vocab_size, max_seq_len=self.config.max_seq_len,
        )
        temperature = check_temperature(temperature)
        routes = None
        if routed_experts is not None:
            routes = check_routes(self.model_config, prompt_ids, completion_ids, routed_experts)
        layers = None if return_hidden_states is None else check_hidden_layers(self.model_config, return_hidden_states)
        version, params, derived = self.weights_snapshot()
        if layers is None:
            logprobs = self.scorer.score(params, derived, prompt_ids, completion_ids, temperature, routes)
            return Scores(tuple(logprobs), version)
        logprobs, hidden = self.scorer.score_with_hidden(
            params, derived, prompt_ids, completion_ids, temperature, routes, hidden_layers=layers
        )
        return Scores(tuple(logprobs), version, tuple(hidden))

    @functools.cached_property
    def scorer(self) -> Scorer:
        """The jitted scoring forward, built on the first `score`."""
        return Scorer(
            self.model_def, max_rows=self.config.max_prefill_batch, max_seq_len=self.config.max_seq_len,
            batch_invariant=self.config.batch_invariant,
        )

    def weights_snapshot(self) -> tuple[int, dict[str, jax.Array], dict[str, jax.Array]]:
        """(version, params, derived) of the committed version, consistent with swaps (see
        WeightState.snapshot); while a swap is being applied, wait for it. The arrays stay valid
        after a later swap (nothing deletes them)."""
        with self._lock:
            while True:
                self._scheduler.check_open()
                snapshot = self._weights.snapshot()
                if snapshot is not None:
                    return snapshot
                self._lock.wait(timeout=1.0)  # the scheduler is swapping it in right now

    # -- status and lifecycle -----------------------------------------------------------------

    @property
    def tokens_generated(self) -> int:
        return self._scheduler.tokens_generated

    def status(self) -> dict[str, Any]:
        scheduler, weights = self._scheduler, self._weights
        kv = scheduler.kv_status() if hasattr(scheduler, "kv_status") else {"layout": "contiguous"}
        with self._lock:
            return {
                "kv": kv,  # paged: pool use, shared pages, preemptions (rollout.engine.native.kv.paged.scheduler)
                "version": weights.committed,
                "serving_version": weights.serving,
                "staged_version": weights.staged_version,
                "queue_depth": len(scheduler.waiting),
                "active_slots": scheduler.slots.active(),
                "max_batch": self.config.max_batch,
                "tokens_generated": scheduler.tokens_generated,
                "requests_finished": scheduler.requests_finished,
                "swaps": weights.swaps,
                "compiled": self.runner.compiled_count(),
                "devices": len(self.mesh.devices.flat),
                "quantization": self.config.quantization,  # None, or how the kernels are stored (int8)
                "alive": scheduler.alive,
            }

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until the scheduler has nothing to do and has let go of its last pass's
        arrays (a request's future resolves before that pass ends): for memory checks."""
        self._scheduler.wait_idle(timeout)

    def shutdown(self) -> None:
        """Stop the scheduler; queued and running requests fail with EngineClosedError."""
        self._scheduler.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
