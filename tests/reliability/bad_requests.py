"""Bad generate requests: each must fail at once on the driver with a clear error, queue nothing
on any worker, and leave a good request running meanwhile alone."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import rollout

from .harness import REQUEST_TIMEOUT_S, Outcome, expected_keys, measured, record_versions, routed_requests, tally


def unchecked_sampling(**fields: Any) -> rollout.SamplingParams:
    """SamplingParams with invalid values, built past the constructor's checks (as a mutated or
    deserialized object could arrive): the service must check them again."""
    sampling = rollout.SamplingParams(max_tokens=8)
    for name, value in fields.items():
        object.__setattr__(sampling, name, value)
    return sampling


@dataclasses.dataclass(frozen=True)
class BadRequest:
    name: str
    prompts: Any
    sampling: Any
    error: type
    fragment: str

    def __str__(self) -> str:
        return self.name


_OK = rollout.SamplingParams(max_tokens=8)
BAD_REQUESTS: list[BadRequest] = [
    BadRequest("empty_prompt", [[]], _OK, ValueError, "empty prompt"),
    BadRequest("empty_string", [""], _OK, ValueError, "empty prompt"),
    BadRequest("one_empty_among_good", [[1, 2], []], _OK, ValueError, "prompt 1: empty prompt"),
    BadRequest("too_long_prompt", [[1] * 121], _OK, ValueError, "121 tokens + max_tokens=8 = 129 exceeds max_seq_len=128"),
    BadRequest("too_many_tokens", [[1, 2]], rollout.SamplingParams(max_tokens=127), ValueError,
               "2 tokens + max_tokens=127 = 129 exceeds max_seq_len=128"),
    BadRequest("id_past_vocab", [[1, 512]], _OK, ValueError, "token id 512 is outside the vocabulary [0, 512)"),
    BadRequest("negative_id", [[-1, 2]], _OK, ValueError, "token id -1 is outside the vocabulary"),
    BadRequest("float_ids", [[1.5, 2]], _OK, TypeError, "token ids must be integers; got float"),
    BadRequest("bool_ids", [[True, 2]], _OK, TypeError, "token ids must be integers; got bool"),
    BadRequest("nested_ids", [[[1, 2]]], _OK, TypeError, "token ids must be integers; got list"),
    BadRequest("temperature_negative", [[1, 2]], unchecked_sampling(temperature=-0.5), ValueError,
               "SamplingParams.temperature=-0.5 is invalid"),
    BadRequest("temperature_nan", [[1, 2]], unchecked_sampling(temperature=float("nan")), ValueError,
               "SamplingParams.temperature=nan is invalid"),
    BadRequest("top_p_zero", [[1, 2]], unchecked_sampling(top_p=0.0), ValueError, "SamplingParams.top_p=0.0 is invalid"),
    BadRequest("top_p_above_one", [[1, 2]], unchecked_sampling(top_p=1.5), ValueError, "SamplingParams.top_p=1.5 is invalid"),
    BadRequest("n_zero", [[1, 2]], unchecked_sampling(n=0), ValueError, "SamplingParams.n=0 is invalid"),
    BadRequest("n_past_max_batch", [[1, 2]], rollout.SamplingParams(n=9, max_tokens=4), ValueError,
               "n=9 samples cannot run together in max_batch=8"),
    BadRequest("max_tokens_zero", [[1, 2]], unchecked_sampling(max_tokens=0), ValueError,
               "SamplingParams.max_tokens=0 is invalid"),
    BadRequest("max_tokens_float", [[1, 2]], unchecked_sampling(max_tokens=4.0), ValueError,
               "SamplingParams.max_tokens=4.0 is invalid"),
    BadRequest("prompt_int", [5], _OK, TypeError, "a prompt must be a string, chat messages or a list of token ids; got int"),
    BadRequest("prompt_dict", [{"role": "user", "content": "hi"}], _OK, TypeError, "got dict"),
    BadRequest("prompt_none", [None], _OK, TypeError, "got NoneType"),
    BadRequest("prompts_not_a_list", 5, _OK, TypeError, "prompts must be a list"),
    BadRequest("prompts_a_string", "hello", _OK, TypeError, "prompts must be a list"),
    BadRequest("sampling_dict", [[1, 2]], {"max_tokens": 8}, TypeError, "sampling must be a rollout.SamplingParams, got dict"),
    BadRequest("sampling_none", [[1, 2]], None, TypeError, "sampling must be a rollout.SamplingParams, got NoneType"),
]

# The same invalid values as callers normally pass them: the constructor refuses them at once.
INVALID_SAMPLING_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("temperature", {"temperature": -0.5}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("n", {"n": 0}),
    ("max_tokens", {"max_tokens": 0}),
]

GOOD_REQUEST = ([[21, 22, 23, 24]], rollout.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))


def try_bad_request(svc: rollout.RolloutService, case: BadRequest) -> Outcome:
    """Send a bad request while a good one runs: it must fail at once, queue nothing, and leave
    the good one alone (its greedy tokens are checked against an undisturbed run)."""
    out = Outcome(case.name, "request", version_before=svc.version)
    with measured(out, svc):
        good = svc.generate_async(*GOOD_REQUEST, timeout=REQUEST_TIMEOUT_S)
        routed = routed_requests(svc)
        start = time.perf_counter()
        try:
            svc.generate(case.prompts, case.sampling, timeout=REQUEST_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001
            out.raised(err)
        out.details["refused_in_s"] = time.perf_counter() - start
        out.details["queued"] = routed_requests(svc) - routed
        completions = list(good)
        tally(out, expected_keys(1, 1), completions)
        out.details["good_tokens"] = [c.token_ids for c in completions]
    out.clear = out.error_is(case.error, case.fragment)
    record_versions(out, svc)
    return out

