"""SglangEngine: an sglang-jax Engine (single process, on this process's devices) behind the
engine boundary (`rollout.engine.backend.EngineBackend`), with rollout's weight state machine.

- Requests: prompts are encoded and validated by rollout (the same errors as the native engine),
  then sent as token ids to sglang-jax's tokenizer manager on a private asyncio loop thread; each
  of the n samples is one sglang-jax request (its radix cache shares the prompt's prefill).
  Text is decoded by rollout's tokenizer, so stops and text match the native engine's.
- Weights: the native engine's state machine (rollout.engine.weight_state.WeightState: versions,
  one staged copy, commit, abort, waiting for the swap), with sglang-jax's model state as its swap
  target. `stage` validates an update against that model state (HF names map its leaves to
  rollout's paths: see state.py) and places each leaf on its serving leaf's sharding; `commit`
  hands the new leaf list to the scheduler thread, which swaps it in at the top of a scheduling
  round, where no step runs, and empties the radix (prefix) cache in the same place, so no prompt
  reuses KV computed under the old weights.
- swap_policy "drain" only: while a swap is pending the scheduler admits nothing new, running
  requests finish on the old weights, then the swap happens and the waiting requests start on
  the new ones. So every request runs on one version, recorded when it is admitted.
- Logprobs: sglang-jax 0.0.2 crashes on CPU when asked for them, so `return_logprobs=True`
  raises LogprobsUnavailableError before anything is queued; the engine keeps serving. Scoring
  is refused likewise. Both are declared in `capabilities` (rollout.engine.backend), which the
  coordinator reads once to refuse them before anything reaches a worker.
- Sampling seeds: not reproducible per request. 0.0.2 takes a per-request seed only with its
  deterministic sampling, whose CPU path samples almost uniformly (it applies softmax to
  probabilities) and whose hash-based noise is biased even on logits; RL on such samples does not
  learn (measured: docs/benchmarks.md). So it stays off and `seed` is not passed on.
- Streaming: a streamed request's sink is fed from sglang-jax's scheduler thread after every step
  that adds tokens (the request's exact token ids, as the scheduler holds them; the text decoded by
  rollout, an incomplete trailing character held back), then once more with the finished sample.
  sglang-jax's own streamed output is not used: its detokenizer re-sends ids around incomplete
  characters.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Self

from rollout.engine.backend import FeatureUnavailableError
from rollout.engine.config import EngineConfig
from rollout.engine.sampling_params import SamplingParams
from rollout.engine.sglang import requirements, workarounds
from rollout.engine.sglang.compiles import CompileCounter
from rollout.engine.sglang.requirements import LogprobsUnavailableError, logprobs_unavailable  # noqa: F401 (re-exported)
from rollout.engine.staging import StagedWeights, check_host_leaf
from rollout.engine.types import Completion, EngineClosedError
from rollout.engine.weight_state import WeightState, WeightVersions
from rollout.models.config import ModelConfig
from rollout.prompts import Prompt, PromptValidator
from rollout.tokenizer import Tokenizer
from rollout.weights.loader import load_checkpoint, resolve_checkpoint
from rollout.weights.spec import ParamSpec

log = logging.getLogger("rollout.engine")


class _SignalsWithoutHandlers:
    """The `signal` module as sglang-jax's engine module sees it while it starts: installing a
    handler is skipped. Its handlers are meant for its own server process (SIGCHLD reaps any
    child, SIGQUIT kills the process tree), and `signal.signal` raises outside the main thread,
    where a Ray actor builds its engine."""

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    @staticmethod
    def signal(signalnum: Any, handler: Any) -> Any:
        return signal.getsignal(signalnum)


@contextlib.contextmanager
def _no_signal_handlers(module: Any) -> Iterator[None]:
    real = module.signal
    module.signal = _SignalsWithoutHandlers()
    try:
        yield
    finally:
        module.signal = real


@contextlib.contextmanager
def _mesh_over(module: Any, devices: Sequence[Any]) -> Iterator[None]:
    """sglang-jax's scheduler builds its mesh over every device the process sees (data x tensor);
    while it starts, its `create_device_mesh` gets the engine's own devices (tensor parallel over
    them), as the native engine's mesh does."""
    real = module.create_device_mesh

    def create_device_mesh(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("devices", list(devices))
        return real(*args, **kwargs)

    module.create_device_mesh = create_device_mesh
    try:
        yield
    finally:
        module.create_device_mesh = real


@dataclasses.dataclass(frozen=True)
class _Text:
    text: str
    cut: bool = True  # final: nothing held back for a stop string


class _RunningSample:
    """A sample still decoding, in the shape a streaming sink reads (rollout.engine.streaming)."""

    def __init__(self, index: int, tokens: list[int], version: int, text: str):
        self.index = index
        self.tokens = tokens
        self.logprobs: list[float] = []
        self.versions = [version] * len(tokens)
        self.text = _Text(text.rstrip("\ufffd"), cut=False)  # a character whose bytes are not all here yet
        self.finish_reason = None


class _FinishedSample:
    """A finished completion in the shape a streaming sink reads (rollout.engine.streaming)."""

    def __init__(self, completion: Completion):
        self.index = completion.sample_index
        self.tokens = list(completion.token_ids)
        self.logprobs: list[float] = []
        self.versions = list(completion.token_versions)
        self.text = _Text(completion.text)
        self.finish_reason = completion.finish_reason


_CONTEXT_HEADROOM = 6


def _paddings(limit: int, start: int) -> list[int]:
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= 2
    return [*out, limit]


class SglangEngine(WeightVersions):
    """One sglang-jax Engine on `devices` (tensor parallel over them), rollout's interface."""

    backend = "sglang-jax"

    def __init__(
        self,
        model: str | Path,
        config: EngineConfig = EngineConfig(),
        devices: Sequence[Any] | None = None,
        *,
        progress: bool = False,
        engine_options: Mapping[str, Any] | None = None,
        _skip_workarounds: tuple[str, ...] = (),
    ):
        if config.batch_invariant:
            from rollout.models.invariant import BatchInvariantUnsupportedError

            raise BatchInvariantUnsupportedError(
                "batch_invariant=True needs the native engine (engine='native'): sglang-jax's kernels (its "
                "matmuls, attention and sampler) are not batch-invariant, and its deterministic mode only seeds the sampler"
            )
        requirements.check_python()
        self.sglang_version = requirements.installed_version()
        requirements.check_msgpack()
        requirements.check_swap_policy(config.swap_policy)
        requirements.check_quantization(config.quantization)
        self.config = config
        self.checkpoint = resolve_checkpoint(model)
        self.model_config = ModelConfig.from_pretrained(self.checkpoint)
        requirements.check_architecture(self.model_config)
        requirements.check_head_dim(self.model_config)
        self.tokenizer = Tokenizer.from_pretrained(self.checkpoint)
        self.prompts = PromptValidator(self.model_config, self.tokenizer, config)
        self.eos_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.workarounds = workarounds.apply(self.sglang_version, skip=_skip_workarounds)

        import jax

        from rollout.models.bind import ModelDef

        self.compiles = CompileCounter.install()
        devices = list(devices) if devices is not None else jax.local_devices()[:1]
        self.devices = devices
        # what it cannot do: the coordinator reads this once and refuses those requests up front
        self.capabilities = requirements.capabilities(self.sglang_version, devices[0].platform)
        self._spec = ModelDef.create(self.model_config, config.dtype).spec
        self._engine = self._start_sglang(devices, engine_options or {})
        self._scheduler = self._engine.scheduler_info["scheduler"]
        from rollout.engine.sglang.state import ModelState

        self._state = ModelState(self._scheduler.tp_worker.worker.model_runner, self._spec)

        self._lock = threading.Condition()  # the weight state's and the request maps'
        # A commit(wait=True) gives up once the scheduler is shut down or failed.
        self._weights: WeightState[list[Any]] = WeightState(
            self._lock, self._state, stopped=lambda: self._closed or self._error is not None
        )
        self._admitted: dict[str, int] = {}  # rid -> version it was admitted under
        self._rids: dict[int, list[str]] = {}  # id(future) -> its sglang-jax request ids
        self._final_ids: dict[str, list[int]] = {}  # rid -> its tokens, recorded by the scheduler
        self._streams: dict[str, tuple[Any, int]] = {}  # rid of a streamed sample -> (its sink, sample index)
        self._closed = False
        self._error: BaseException | None = None
        self._park = threading.Event()
        # Tests turn it off to show what the eviction at each swap prevents; nothing else should.
        self._evict_prefix_on_swap = True
        self.tokens_generated = 0
        self.requests_finished = 0
        self._hook_scheduler()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="rollout-sglang-client", daemon=True)
        self._loop_thread.start()

    def _start_sglang(self, devices: Sequence[Any], extra: Mapping[str, Any]) -> Any:
        from sgl_jax.srt.entrypoints import engine as sglang_engine_module
        from sgl_jax.srt.entrypoints.engine import Engine as SglEngine

        platform = devices[0].platform
        cfg = self.config
        # one prefill holds at most max_prefill_batch prompts of max_seq_len; sglang-jax's default
        # (16384 tokens) would also precompile (and run, in its warm-up) a 16384-token extend
        prefill_tokens = max(64, cfg.max_prefill_batch * cfg.max_seq_len)
        options: dict[str, Any] = dict(
            model_path=str(self.checkpoint),
            load_format=cfg.load_format,
            enable_single_process=True,
            device=platform,
            tp_size=len(devices),
            dtype=cfg.dtype,
            random_seed=cfg.seed,
            max_running_requests=cfg.max_batch,
            # KV for max_batch sequences of max_seq_len (without it sglang-jax takes half the RAM)
            max_total_tokens=cfg.max_batch * (cfg.max_seq_len + _CONTEXT_HEADROOM),
            # sglang-jax clips new tokens to context_length - prompt - 2 and refuses prompts over
            # context_length - 6; rollout allows prompt + max_tokens == max_seq_len
            context_length=cfg.max_seq_len + _CONTEXT_HEADROOM,
            precompile_bs_paddings=_paddings(cfg.max_batch, 1),
            precompile_token_paddings=_paddings(prefill_tokens, 64),
            max_prefill_tokens=prefill_tokens,
            # its seeded sampling (the only per-request seed it has) does not sample from the
            # model's distribution on CPU: off, so SamplingParams.seed is not reproducible here
            enable_deterministic_sampling=False,
            chunked_prefill_size=-1,
            disable_overlap_schedule=True,  # a swap must happen where no step is in flight
            skip_server_warmup=True,
            log_level="error",
        )
        if platform == "cpu":
            options["attention_backend"] = "native"  # its default ("fa") is a TPU kernel
        options.update(extra)
        from sgl_jax.srt.managers import scheduler as scheduler_module

        with _no_signal_handlers(sglang_engine_module), _mesh_over(scheduler_module, devices):
            engine = SglEngine(**options)
        # Engine.shutdown kills every child process of this one (a local Ray's included): never
        # let it run at exit; `shutdown` here parks the scheduler instead.
        atexit.unregister(engine.shutdown)
        return engine

    # -- the scheduler hook: runs in sglang-jax's scheduler thread, between steps ---------------

    def _hook_scheduler(self) -> None:
        scheduler = self._scheduler
        original = scheduler.get_next_batch_to_run
        socket = scheduler.recv_from_tokenizer

        def get_next_batch_to_run() -> Any:
            try:
                if self._closed:
                    self._park.wait()  # shut down: the thread stays parked, idle
                batch = original() if self._weights.pending is None else self._drain_then_swap(original)
                if batch is None and not scheduler.waiting_queue and self._weights.pending is None:
                    socket.poll(20)  # idle: wait for a request instead of spinning (0.0.2 busy-loops)
                elif batch is not None and batch.forward_mode.is_extend():
                    version = self._weights.serving
                    for req in batch.reqs:
                        self._admitted.setdefault(req.rid, version)
                return batch
            except BaseException as err:
                self._error = err
                log.exception("sglang-jax scheduler hook failed")
                raise

        scheduler.get_next_batch_to_run = get_next_batch_to_run
        original_stream = scheduler.stream_output

        def stream_output(reqs: list[Any], *args: Any, **kwargs: Any) -> Any:
            # A finished request's token ids, straight from the scheduler: 0.0.2's detokenizer
            # path repeats ids of non-streamed requests longer than 50 tokens in `output_ids`.
            # Streamed samples get their tokens so far here too, after every step.
            for req in reqs:
                if not str(req.rid).startswith("rollout-"):
                    continue
                if req.finished():
                    self._final_ids[req.rid] = [int(t) for t in req.output_ids]
                elif req.rid in self._streams:
                    self._feed(req)
            return original_stream(reqs, *args, **kwargs)

        scheduler.stream_output = stream_output

    def _feed(self, req: Any) -> None:
        """Give a streamed sample's sink its tokens so far (scheduler thread)."""
        entry = self._streams.get(req.rid)
        if entry is None or not req.output_ids:
            return
        sink, index = entry
        tokens = [int(t) for t in req.output_ids]
        version = self._admitted.get(req.rid, self._weights.serving)
        try:
            sink.update(_RunningSample(index, tokens, version, self.tokenizer.decode(tokens)))
        except Exception:  # a consumer's failure must not stop the scheduler
            log.exception("streaming sink of %s failed", req.rid)

    def _drain_then_swap(self, original: Any) -> Any:
        """drain: decode what runs with nothing new admitted; once nothing runs, swap and admit."""
        scheduler = self._scheduler
        waiting = scheduler.waiting_queue
        scheduler.waiting_queue = []
        try:
            batch = original()
        finally:
            scheduler.waiting_queue = waiting + scheduler.waiting_queue  # retracted ones come back
        if batch is not None or scheduler.chunked_req is not None:
            return batch
        self._swap_now()
        return original()

    def _swap_now(self) -> None:
        with self._lock:
            swap = self._weights.take_swap(running=False)  # drain: nothing runs now
        if swap is None:
            return
        start = time.perf_counter()
        # emptied before the swap is recorded, so status never shows the new version beside old KV
        cache = self._scheduler.tree_cache
        evicted = 0
        if self._evict_prefix_on_swap and hasattr(cache, "evictable_size"):  # radix cache: drop all unlocked
            evicted = cache.evictable_size()
            cache.evict(evicted)
        self._weights.apply(swap)  # sglang-jax's model state serves the new leaves from the next step
        log.info(
            json.dumps(
                {
                    "event": "weights_swapped",
                    "backend": self.backend,
                    "version": swap.weights.version,
                    "policy": swap.policy,
                    "prefix_tokens_evicted": int(evicted),
                    "swap_s": round(time.perf_counter() - start, 6),
                }
            )
        )

    # -- weights ------------------------------------------------------------------------------

    @property
    def spec(self) -> ParamSpec:
        """The native engine's spec for the same checkpoint (rollout paths, shapes, dtypes)."""
        return self._spec

    def current_params(self) -> dict[str, Any]:
        """rollout path -> serving device array, in sglang-jax's layout (do not mutate)."""
        return self._state.current()

    def stage(self, version: int, params: Any, *, finite_checked: bool = False) -> StagedWeights[list[Any]]:
        """Validate `params` against sglang-jax's model state and place them beside the serving
        leaves. SpecMismatchError / NonFiniteWeightsError / WeightSyncError leave everything as
        it was. A newer stage replaces an older one."""
        self._check_open()
        return self._weights.stage(version, lambda: self._state.prepare(params, finite_checked=finite_checked))

    def stage_checkpoint(self, version: int, model: str | Path) -> StagedWeights[list[Any]]:
        """Stage the weights of an HF checkpoint directory or repo id (read one tensor at a time)."""
        self._check_open()
        want = self._spec.by_path()

        def build() -> list[Any]:
            host = load_checkpoint(
                resolve_checkpoint(model), self._spec, lambda path, array: check_host_leaf(path, array, want[path].dtype)
            )
            return self._state.prepare(host, finite_checked=True)

        return self._weights.stage(version, build)

    def commit(self, version: int, policy: str | None = None, *, wait: bool = False, timeout: float | None = None) -> int:
        """Swap the staged `version` in at the scheduler's next round (drain: after the running
        requests finish). After this returns no request is admitted under an older version."""
        policy = policy or self.config.swap_policy
        requirements.check_swap_policy(policy)
        self._check_open()
        return self._weights.commit(version, policy, wait=wait, timeout=timeout)

    def abort(self, version: int | None = None) -> bool:
        """Drop the staged copy (of `version`, or whatever is staged). True if one was dropped."""
        return self._weights.abort(version)

    # -- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return self.prompts.encode(prompt)

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
        `sink` (streaming) gets each sample's tokens so far after every step that adds some (from
        the scheduler thread), then the finished sample."""
        if return_logprobs:
            raise logprobs_unavailable(self.sglang_version, self.devices[0].platform)
        if sampling.top_logprobs:
            raise FeatureUnavailableError(requirements.top_logprobs_message(self.sglang_version, self.devices[0].platform))
        if sampling.constraint is not None:
            raise FeatureUnavailableError(requirements.structured_output_message())
        ids = self.encode_prompt(prompt)
        self.prompts.validate(ids, sampling)
        if sampling.ignore_eos and sampling.stop_token_ids:
            raise ValueError(
                "ignore_eos=True with stop_token_ids is not available with engine='sglang-jax' (its ignore_eos "
                "disables stop ids too); drop one of them, or use engine='native'"
            )
        self._check_open()
        future: Future[list[Completion]] = Future()
        rids = [f"rollout-{uuid.uuid4().hex}-{i}" for i in range(sampling.n)]
        with self._lock:
            self._rids[id(future)] = rids
            if sink is not None:
                self._streams.update({rid: (sink, i) for i, rid in enumerate(rids)})
        running = asyncio.run_coroutine_threadsafe(self._generate(ids, sampling, rids, prompt_index), self._loop)

        def done(f: Any) -> None:
            with self._lock:
                self._rids.pop(id(future), None)
                for rid in rids:
                    self._streams.pop(rid, None)
            if f.exception() is not None:
                future.set_exception(f.exception())
                return
            if sink is not None:
                for completion in f.result():
                    sink.update(_FinishedSample(completion))
            future.set_result(f.result())

        running.add_done_callback(done)
        return future

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        return_logprobs: bool = True,
        timeout: float | None = None,
    ) -> list[Completion]:
        """Generate for every prompt, in order. Every prompt is validated before any is queued."""
        if return_logprobs:
            self.submit([], sampling, return_logprobs=True)  # raises LogprobsUnavailableError
        encoded = self.prompts.encode_all(prompts, sampling)
        futures = [self.submit(ids, sampling, prompt_index=i, return_logprobs=False) for i, ids in enumerate(encoded)]
        return [c for f in futures for c in f.result(timeout)]

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Any], *, temperature: float = 1.0) -> Any:
        """Not available on this backend (see `capabilities`): raises FeatureUnavailableError."""
        raise FeatureUnavailableError(requirements.score_message(self.sglang_version))

    def cancel(self, future: Future[list[Completion]]) -> bool:
        with self._lock:
            if future.done():
                return False
            rids = list(self._rids.get(id(future), ()))
        manager = self._engine.tokenizer_manager
        for rid in rids:
            self._loop.call_soon_threadsafe(manager.abort_request, rid)
        return True

    def _sampling_params(self, sampling: SamplingParams) -> dict[str, Any]:
        # sglang-jax stops at its own EOS ids (the checkpoint's, as rollout's) unless ignore_eos,
        # which also disables stop_token_ids: that one combination is refused in submit.
        params: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "top_k": int(sampling.top_k) if sampling.top_k > 0 else -1,
            "ignore_eos": bool(sampling.ignore_eos),
            "skip_special_tokens": False,
        }
        if not sampling.ignore_eos:
            params["stop_token_ids"] = sorted(set(sampling.stop_token_ids) | set(self.eos_ids))
        if sampling.stop:
            params["stop"] = list(sampling.stop)
        return params

    async def _generate(self, ids: list[int], sampling: SamplingParams, rids: list[str], prompt_index: int) -> list[Completion]:
        from sgl_jax.srt.managers.io_struct import GenerateReqInput

        params = self._sampling_params(sampling)
        n = len(rids)
        request = GenerateReqInput(
            input_ids=[list(ids) for _ in range(n)],
            sampling_params=[dict(params) for _ in range(n)],
            rid=list(rids),
            return_logprob=False,
        )
        outputs = await self._engine.tokenizer_manager.generate_request(request, None).__anext__()
        outputs = outputs if isinstance(outputs, list) else [outputs]
        completions = []
        for index, (rid, out) in enumerate(zip(rids, outputs)):
            completions.append(self._completion(rid, out, ids, sampling, prompt_index, index))
        with self._lock:
            self.requests_finished += 1
        return completions

    def _completion(
        self, rid: str, out: Mapping[str, Any], ids: list[int], sampling: SamplingParams, prompt_index: int, index: int
    ) -> Completion:
        final = self._final_ids.pop(rid, None)
        tokens = tuple(final if final is not None else (int(t) for t in out.get("output_ids", ())))
        meta = out.get("meta_info", {})
        reason = (meta.get("finish_reason") or {}).get("type", "abort")
        reason = reason if reason in ("stop", "length") else "abort"
        text = self.tokenizer.decode(list(tokens))
        for stop in sampling.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        with self._lock:
            version = self._admitted.pop(rid, self._weights.serving)
            self.tokens_generated += len(tokens)
        return Completion(
            prompt_index=prompt_index,
            sample_index=index,
            prompt_token_ids=tuple(ids),
            token_ids=tokens,
            text=text,
            logprobs=None,
            finish_reason=reason,
            weight_version=version,
            token_versions=(version,) * len(tokens),
        )

    # -- status and lifecycle -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        scheduler = self._scheduler
        with self._lock:
            return {
                "backend": self.backend,
                "sglang_jax_version": self.sglang_version,
                "workarounds": list(self.workarounds),
                "version": self._weights.committed,
                "serving_version": self._weights.serving,
                "staged_version": self._weights.staged_version,
                "queue_depth": len(scheduler.waiting_queue),
                "active_slots": len(scheduler.running_batch.reqs or ()),
                "max_batch": self.config.max_batch,
                "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished,
                "swaps": self._weights.swaps,
                "compiled": self.compiles.count,
                "devices": len(self.devices),
                "alive": self._error is None and not self._closed and self._loop_thread.is_alive(),
            }

    def shutdown(self) -> None:
        """Stop serving: running and queued requests are aborted; the scheduler thread parks."""
        with self._lock:
            if self._closed:
                return
            pending = [rid for rids in self._rids.values() for rid in rids]
        manager = self._engine.tokenizer_manager
        for rid in pending:
            self._loop.call_soon_threadsafe(manager.abort_request, rid)
        deadline = time.monotonic() + 10
        while self._rids and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._closed = True
            self._lock.notify_all()  # a commit(wait=True) gives up
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        if self._error is not None:
            raise EngineClosedError(f"the sglang-jax scheduler failed: {self._error!r}") from self._error
        if self._closed:
            raise EngineClosedError("the engine is shut down; create a new one")
