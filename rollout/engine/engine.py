"""The native JAX engine: slot-based continuous batching with versioned, atomic weight swaps.

A scheduler thread owns the slots. Each turn it (1) applies a committed weight swap if the swap
policy allows it now, (2) admits waiting requests into free slots with one batched prefill (the
n samples of a prompt share it), and (3) runs `decode_steps` decode steps for every active slot.
Callers submit from any thread and get futures.

Weight sync is stage -> commit (or abort). `stage` validates and places the new leaves beside the
serving ones while serving goes on; `commit` hands them to the scheduler, which swaps them in at
a step boundary under the swap policy:

- drain (default): running sequences finish on the old weights; new ones wait for the swap.
- recompute: swap now; running sequences re-prefill prompt + generated tokens on the new weights.
- continue: swap now and keep their KV cache; each token records the version that produced it.

Once `commit` returns, no request is admitted under an older version.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from rollout.engine.config import SWAP_POLICIES, EngineConfig
from rollout.engine.runner import ModelRunner
from rollout.engine.sampling import SamplingParams, SlotSampling, stack_sampling
from rollout.engine.staging import StagedWeights, stage_params
from rollout.engine.types import Completion, EngineClosedError, WeightSyncError
from rollout.models.bind import ModelDef
from rollout.models.config import ModelConfig
from rollout.prompts import Prompt, PromptValidator
from rollout.sharding import make_mesh
from rollout.tokenizer import IncrementalDetokenizer, Tokenizer
from rollout.weights.loader import load_checkpoint, resolve_checkpoint
from rollout.weights.spec import ParamSpec

log = logging.getLogger("rollout.engine")


@dataclasses.dataclass
class _Sample:
    request: "_Request"
    index: int
    detok: IncrementalDetokenizer
    slot: int = -1
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    text_cut: bool = False  # cut at a stop string: later pieces are not text
    finish_reason: str | None = None


@dataclasses.dataclass
class _Request:
    prompt_index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    return_logprobs: bool
    future: Future
    stop_ids: frozenset[int]
    samples: list[_Sample] = dataclasses.field(default_factory=list)


class Engine:
    """One engine on one device mesh. Construct it, `submit`/`generate`, `stage`/`commit`."""

    def __init__(
        self,
        model: str | Path,
        config: EngineConfig = EngineConfig(),
        devices: Sequence[jax.Device] | None = None,
        *,
        progress: bool = False,
    ):
        self.config = config
        self.checkpoint = resolve_checkpoint(model)
        self.model_config = ModelConfig.from_pretrained(self.checkpoint)
        self.tokenizer = Tokenizer.from_pretrained(self.checkpoint)
        self.prompts = PromptValidator(self.model_config, self.tokenizer, config)
        self.eos_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.model_def = ModelDef.create(self.model_config, config.dtype)
        self.mesh = make_mesh(devices)
        self.runner = ModelRunner(
            self.model_def,
            self.mesh,
            max_batch=config.max_batch,
            max_seq_len=config.max_seq_len,
            decode_steps=config.decode_steps,
        )
        if config.load_format == "dummy":
            params = self.dummy_params()
        else:
            params = load_checkpoint(
                self.checkpoint,
                self.spec,
                self._place_host,
                tie_word_embeddings=self.model_config.tie_word_embeddings,
                progress=progress,
            )
        self.runner.set_params(params)

        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._cancelled: set[int] = set()  # id() of futures to abort at the next boundary
        self._slots: list[_Sample | None] = [None] * config.max_batch
        self._tok = np.zeros(config.max_batch, np.int32)  # pending token per slot (not yet in KV)
        self._pos = np.full(config.max_batch, config.max_seq_len, np.int32)  # its position; idle = max
        self._sampling_rows: list[tuple[float, int, float, int, int]] = [(0.0, 0, 1.0, 0, 0)] * config.max_batch
        self._sampling: SlotSampling | None = None
        self._sampling_slots: tuple[int, ...] = ()
        self._serving_version = 0
        self._committed_version = 0
        self._staged: StagedWeights | None = None
        self._pending: tuple[StagedWeights, str] | None = None  # committed, not yet swapped in
        self._swapped = threading.Condition(self._lock)
        self._closed = False
        self._error: BaseException | None = None
        self._rng = np.random.default_rng(config.seed)
        self.tokens_generated = 0
        self.requests_finished = 0
        self.swaps = 0
        self._thread = threading.Thread(target=self._loop, name="rollout-scheduler", daemon=True)
        self._thread.start()

    # -- weights ------------------------------------------------------------------------------

    @property
    def spec(self) -> ParamSpec:
        """Paths, shapes and dtypes of the engine's parameters."""
        return self.model_def.spec

    @property
    def param_shardings(self) -> dict[str, jax.sharding.Sharding]:
        return self.runner.param_shardings

    @property
    def version(self) -> int:
        """The latest committed version (new requests are served by it or a newer one)."""
        return self._committed_version

    @property
    def serving_version(self) -> int:
        return self._serving_version

    def _place_host(self, path: str, array: np.ndarray) -> jax.Array:
        from rollout.engine.staging import check_host_leaf

        return self.runner.place(path, check_host_leaf(path, array, self.spec.by_path()[path].dtype))

    def dummy_params(self) -> dict[str, jax.Array]:
        """Parameters of the right tree, shapes, dtypes and shardings, from shapes alone:
        zeros, and ones for norm weights. Generation runs (uniform logits) until a real sync."""
        out = {}
        for leaf in self.spec.leaves:
            fill = jax.numpy.ones if leaf.path.endswith("norm.weight") else jax.numpy.zeros
            make = jax.jit(lambda f=fill, l=leaf: f(l.shape, l.dtype), out_shardings=self.param_shardings[leaf.path])
            out[leaf.path] = make()
        return out

    def current_params(self) -> dict[str, jax.Array]:
        """The serving parameters (device arrays; do not mutate)."""
        return dict(self.runner.params)

    def stage(self, version: int, params: Any, *, finite_checked: bool = False) -> StagedWeights:
        """Validate and place `params` as `version` beside the serving weights.

        Raises SpecMismatchError / NonFiniteWeightsError / WeightSyncError; on any error the
        engine's weights, version and outputs are unchanged. A newer stage replaces an older one.
        `finite_checked=True` skips the finiteness pass: only for values already counted finite
        (a worker staging checksum-verified buckets of a packer that counted them).
        """
        self._check_open()
        if not isinstance(version, int) or version <= self._committed_version:
            raise WeightSyncError(
                f"cannot stage version {version!r}: versions only go forward and version "
                f"{self._committed_version} is already committed; stage a larger version"
            )
        staged = self._derive(
            stage_params(version, params, self.spec, self.runner.place, finite_checked=finite_checked)
        )
        with self._lock:
            if version <= self._committed_version:
                raise WeightSyncError(f"version {version} was overtaken by commit of {self._committed_version}")
            self._staged = staged  # drops any older staged copy: one staged copy at most
        return staged

    def stage_checkpoint(self, version: int, model: str | Path) -> StagedWeights:
        """Stage the weights of an HF checkpoint (local directory or repo id) as `version`.

        The safetensors are read one tensor at a time straight onto the devices; the
        checkpoint must describe the same model (config shapes) as the one being served.
        """
        self._check_open()
        if not isinstance(version, int) or version <= self._committed_version:
            raise WeightSyncError(
                f"cannot stage version {version!r}: version {self._committed_version} is already committed"
            )
        start = time.perf_counter()
        directory = resolve_checkpoint(model)
        params = load_checkpoint(
            directory, self.spec, self._place_host, tie_word_embeddings=self.model_config.tie_word_embeddings
        )
        jax.block_until_ready(params)
        staged = self._derive(StagedWeights(version, params, self.spec.nbytes, time.perf_counter() - start))
        with self._lock:
            self._staged = staged
        return staged

    def _derive(self, staged: StagedWeights) -> StagedWeights:
        """`staged` with the runner's serving-only leaves made now, off the swap's critical path."""
        start = time.perf_counter()
        derived = jax.block_until_ready(self.runner.derive(staged.params))
        return dataclasses.replace(staged, derived=derived, seconds=staged.seconds + time.perf_counter() - start)

    def commit(self, version: int, policy: str | None = None, *, wait: bool = False, timeout: float | None = None) -> int:
        """Swap in the staged `version` at the next step boundary allowed by `policy`.

        After this returns, no request is admitted under an older version. With `wait`, block
        until the swap is applied. Committing the current version again is a no-op (retries).
        """
        policy = policy or self.config.swap_policy
        if policy not in SWAP_POLICIES:
            raise ValueError(f"policy={policy!r}: expected one of {SWAP_POLICIES}")
        with self._lock:
            self._check_open()
            if version == self._committed_version and (self._staged is None or self._staged.version != version):
                return version
            if self._staged is None or self._staged.version != version:
                have = None if self._staged is None else self._staged.version
                raise WeightSyncError(
                    f"cannot commit version {version}: it was not staged (staged: {have}, "
                    f"committed: {self._committed_version}); call stage({version}, params) first"
                )
            self._pending = (self._staged, policy)
            self._staged = None
            self._committed_version = version
            self._lock.notify_all()
            if wait:
                ok = self._swapped.wait_for(lambda: self._serving_version >= version or self._closed, timeout)
                if not ok:
                    raise TimeoutError(f"version {version} was committed but not swapped in within {timeout}s")
        return version

    def abort(self, version: int | None = None) -> bool:
        """Drop the staged copy (of `version`, or whatever is staged). True if one was dropped."""
        with self._lock:
            if self._staged is not None and (version is None or self._staged.version == version):
                self._staged = None
                return True
            return False

    @property
    def staged_version(self) -> int | None:
        staged = self._staged
        return None if staged is None else staged.version

    # -- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A string, chat messages (list of {"role", "content"}), or token ids -> token ids."""
        return self.prompts.encode(prompt)

    def validate_request(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """Raise ValueError/TypeError for a request this engine cannot serve."""
        self.prompts.validate(prompt_ids, sampling)

    def submit(
        self,
        prompt: Prompt,
        sampling: SamplingParams = SamplingParams(),
        *,
        prompt_index: int = 0,
        return_logprobs: bool = True,
    ) -> "Future[list[Completion]]":
        """Queue one prompt; the future yields its n completions. Bad requests raise here."""
        ids = self.encode_prompt(prompt)
        self.validate_request(ids, sampling)
        seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        request = _Request(
            prompt_index=prompt_index,
            prompt_ids=ids,
            sampling=sampling,
            seed=seed,
            return_logprobs=return_logprobs,
            future=Future(),
            stop_ids=frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos else self.eos_ids),
        )
        request.samples = [_Sample(request, i, IncrementalDetokenizer(self.tokenizer)) for i in range(sampling.n)]
        with self._lock:
            self._check_open()
            self._waiting.append(request)
            self._lock.notify_all()
        return request.future

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        return_logprobs: bool = True,
        timeout: float | None = None,
    ) -> list[Completion]:
        """Generate for every prompt; completions ordered by (prompt_index, sample_index).
        Every prompt is validated before any is queued."""
        encoded = self.prompts.encode_all(prompts, sampling)
        futures = [
            self.submit(ids, sampling, prompt_index=i, return_logprobs=return_logprobs)
            for i, ids in enumerate(encoded)
        ]
        return [c for f in futures for c in f.result(timeout)]

    def cancel(self, future: "Future[list[Completion]]") -> bool:
        """Stop a submitted request at the next step boundary. Its samples end with
        finish_reason "abort" and keep the tokens generated so far. False if already done."""
        with self._lock:
            if future.done():
                return False
            self._cancelled.add(id(future))
            self._lock.notify_all()
            return True

    # -- scoring (rollout.engine.scoring) -------------------------------------------------------

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Any], *, temperature: float = 1.0) -> Any:
        """Per-token logprobs of `completions[i]` (token ids) after `prompts[i]`, teacher-forced,
        all on one weight version: a `rollout.Scores` (logprobs, weight_version)."""
        from rollout.engine.scoring import score_on_engine

        return score_on_engine(self, prompts, completions, temperature)

    @functools.cached_property
    def scorer(self) -> Any:
        from rollout.engine.scoring import Scorer

        return Scorer(self.model_def, max_rows=self.config.max_prefill_batch, max_seq_len=self.config.max_seq_len)

    def weights_snapshot(self) -> tuple[int, dict[str, jax.Array], dict[str, jax.Array]]:
        """(version, params, derived) of the committed version, consistent with swaps: a committed
        update that is not swapped in yet is taken from its staged copy; while a swap is being
        applied, wait for it. The arrays stay valid after a later swap (nothing deletes them)."""
        with self._lock:
            while True:
                self._check_open()
                if self._pending is not None:
                    staged = self._pending[0]
                    return staged.version, staged.params, staged.derived
                if self._serving_version == self._committed_version:
                    return self._serving_version, self.runner.params, self.runner.derived
                self._swapped.wait(timeout=1.0)  # the scheduler is swapping it in right now

    # -- status and lifecycle -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": self._committed_version,
                "serving_version": self._serving_version,
                "staged_version": self.staged_version,
                "queue_depth": len(self._waiting),
                "active_slots": sum(s is not None for s in self._slots),
                "max_batch": self.config.max_batch,
                "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished,
                "swaps": self.swaps,
                "compiled": self.runner.compiled_count(),
                "devices": len(self.mesh.devices.flat),
                "alive": self._thread.is_alive() and self._error is None,
            }

    def shutdown(self) -> None:
        """Stop the scheduler; queued and running requests fail with EngineClosedError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=60)
        self._fail_all(EngineClosedError("the engine was shut down before the request finished"))

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        if self._error is not None:
            raise EngineClosedError(f"the engine's scheduler died: {self._error!r}") from self._error
        if self._closed:
            raise EngineClosedError("the engine is shut down; create a new one")

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            requests = list(self._waiting) + list({id(s.request): s.request for s in self._slots if s}.values())
            self._waiting.clear()
            self._slots = [None] * self.config.max_batch
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    # -- the scheduler ------------------------------------------------------------------------

    def _loop(self) -> None:
        # A burst: requests prefilled while nothing decoded. Its later chunks are prefilled before
        # the first decode step, so the burst decodes as one batch instead of one chunk running
        # ahead of the next (max_prefill_batch bounds the prefill latency seen by *running*
        # sequences; during a burst none are waiting on it).
        burst = False
        try:
            while True:
                with self._lock:
                    self._lock.wait_for(
                        lambda: self._closed or self._waiting or self._pending or self._cancelled or self._any_active()
                    )
                    if self._closed:
                        return
                    cancelled = self._take_cancelled()
                    pending = self._take_swap()
                    admitted = [] if self._pending else self._take_admissible()
                for sample in cancelled:
                    self._finish(sample, "abort")
                if pending is not None:
                    self._swap(*pending)
                if admitted:
                    burst = burst or not self._any_active()
                    self._prefill(admitted)
                    if burst:
                        continue  # the next pass admits more of it, or decodes when none fits
                burst = False
                if self._any_active():
                    self._decode()
        except BaseException as err:  # surface scheduler crashes to every caller
            log.exception("scheduler crashed")
            self._error = err
            self._fail_all(EngineClosedError(f"the engine's scheduler crashed: {err!r}"))

    def _take_cancelled(self) -> list[_Sample]:
        """Samples of cancelled requests, waiting ones included (they finish with no tokens)."""
        if not self._cancelled:
            return []
        hit = self._cancelled
        self._cancelled = set()
        out = [s for s in self._slots if s is not None and id(s.request.future) in hit]
        for request in [r for r in self._waiting if id(r.future) in hit]:
            self._waiting.remove(request)
            out += request.samples
        return out

    def _any_active(self) -> bool:
        return any(s is not None for s in self._slots)

    def _take_swap(self) -> tuple[StagedWeights, str] | None:
        if self._pending is None:
            return None
        staged, policy = self._pending
        if policy == "drain" and self._any_active():
            return None  # keep decoding the old version; admit nothing new
        self._pending = None
        return staged, policy

    def _swap(self, staged: StagedWeights, policy: str) -> None:
        self.runner.set_params(staged.params, staged.derived)  # the old leaves are released here
        with self._lock:
            self._serving_version = staged.version
            self.swaps += 1
            self._swapped.notify_all()
        log.info(json.dumps({"event": "weights_swapped", "version": staged.version, "policy": policy}))
        if policy == "recompute":
            running = [s for s in self._slots if s is not None]
            for start in range(0, len(running), self.config.max_prefill_batch):
                chunk = running[start : start + self.config.max_prefill_batch]
                self._run_prefill([s.request.prompt_ids + s.tokens for s in chunk], [[s] for s in chunk])

    def _take_admissible(self) -> list[_Request]:
        free = sum(s is None for s in self._slots)
        admitted: list[_Request] = []
        while self._waiting and len(admitted) < self.config.max_prefill_batch:
            n = self._waiting[0].sampling.n
            if n > free:
                break  # first come, first served: do not starve large groups
            admitted.append(self._waiting.popleft())
            free -= n
        return admitted

    def _prefill(self, requests: list[_Request]) -> None:
        free = iter([i for i, s in enumerate(self._slots) if s is None])
        groups = []
        for request in requests:
            for sample in request.samples:
                sample.slot = next(free)
                self._slots[sample.slot] = sample
            groups.append(request.samples)
        self._run_prefill([r.prompt_ids for r in requests], groups)

    def _run_prefill(self, prompts: list[list[int]], groups: list[list[_Sample]]) -> None:
        """Prefill each prompt once into the slots of its group; sample each slot's next token."""
        dst, src, rows = [], [], []
        for row, group in enumerate(groups):
            for sample in group:
                dst.append(sample.slot)
                src.append(row)
                rows.append(self._sampling_row(sample))
        sampling = stack_sampling(rows, self.config.max_batch)
        tokens, logprobs = self.runner.prefill(prompts, dst, src, sampling)
        m = 0
        for row, group in enumerate(groups):
            for sample in group:
                self._sampling_rows[sample.slot] = rows[m]
                self._pos[sample.slot] = len(prompts[row])
                self._accept(sample, int(tokens[m]), float(logprobs[m]))
                m += 1
        self._sampling = None

    def _sampling_row(self, sample: _Sample) -> tuple[float, int, float, int, int]:
        sp = sample.request.sampling
        return (float(sp.temperature), int(sp.top_k), float(sp.top_p), sample.request.seed, sample.index)

    def _decode(self) -> None:
        max_batch = self.config.max_batch
        active = [slot for slot, s in enumerate(self._slots) if s is not None]
        rows = self.runner.decode_batch(len(active))
        if rows == max_batch:
            order = list(range(max_batch))  # every slot decodes in place; idle ones are padding
        else:
            order = active + [max_batch] * (rows - len(active))  # padding rows: out of range
        slots = np.asarray(order, np.int32)
        if self._sampling is None or self._sampling_slots != tuple(order):
            # idle slots hold the default (greedy) row: see _finish
            self._sampling = stack_sampling([self._sampling_rows[s] for s in order if s < max_batch], rows)
            self._sampling_slots = tuple(order)
        padded_pos = np.append(self._pos, self.config.max_seq_len)  # index max_batch: padding
        padded_tok = np.append(self._tok, 0)
        pos, toks = padded_pos[slots], padded_tok[slots]
        tokens, logprobs = self.runner.decode(slots, toks, pos, self._sampling)
        for row, slot in enumerate(order):
            sample = self._slots[slot] if slot < max_batch else None
            if sample is None:
                continue
            for k in range(tokens.shape[0]):
                self._pos[slot] = pos[row] + k + 1
                if self._accept(sample, int(tokens[k, row]), float(logprobs[k, row])):
                    break

    def _accept(self, sample: _Sample, token: int, logprob: float) -> bool:
        """Append a sampled token to `sample`; finish it if a stop fires. True if finished."""
        request = sample.request
        sample.tokens.append(token)
        sample.logprobs.append(logprob)
        sample.versions.append(self._serving_version)
        self.tokens_generated += 1
        piece = sample.detok.push(token)
        sample.text += piece
        reason = None
        if request.sampling.stop and self._cut_stop_string(sample, len(piece)):
            reason = "stop"  # the text is final: cut before the stop string
        elif token in request.stop_ids:
            reason = "stop"
        elif len(sample.tokens) >= request.sampling.max_tokens:
            reason = "length"
        if reason is None:
            self._tok[sample.slot] = token
            return False
        if not sample.text_cut:
            sample.text += sample.detok.flush()  # a trailing incomplete UTF-8 sequence, if any
        self._finish(sample, reason)
        return True

    def _cut_stop_string(self, sample: _Sample, new_chars: int) -> bool:
        stops = sample.request.sampling.stop
        longest = max(len(s) for s in stops)
        start = max(0, len(sample.text) - new_chars - longest + 1)
        hits = [i for s in stops if (i := sample.text.find(s, start)) >= 0]
        if not hits:
            return False
        sample.text = sample.text[: min(hits)]
        sample.text_cut = True
        return True

    def _finish(self, sample: _Sample, reason: str) -> None:
        sample.finish_reason = reason
        if sample.slot >= 0:
            with self._lock:
                self._slots[sample.slot] = None
                self._lock.notify_all()
            self._pos[sample.slot] = self.config.max_seq_len
            self._tok[sample.slot] = 0
            self._sampling_rows[sample.slot] = (0.0, 0, 1.0, 0, 0)
            sample.slot = -1
        self._sampling = None
        request = sample.request
        if all(s.finish_reason is not None for s in request.samples):
            self.requests_finished += 1
            request.future.set_result([self._completion(s) for s in request.samples])

    def _completion(self, sample: _Sample) -> Completion:
        request = sample.request
        return Completion(
            prompt_index=request.prompt_index,
            sample_index=sample.index,
            prompt_token_ids=tuple(request.prompt_ids),
            token_ids=tuple(sample.tokens),
            text=sample.text,
            logprobs=tuple(sample.logprobs) if request.return_logprobs else None,
            finish_reason=sample.finish_reason or "abort",
            weight_version=sample.versions[-1] if sample.versions else self._serving_version,
            token_versions=tuple(sample.versions),
        )
