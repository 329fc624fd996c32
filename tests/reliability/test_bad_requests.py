"""Bad generate requests: each fails at once on the driver with a clear error, nothing is
queued on any worker, and a good request running meanwhile gets exactly its usual answer."""

from __future__ import annotations

import pytest

import rollout

from .bad_requests import BAD_REQUESTS, GOOD_REQUEST, INVALID_SAMPLING_FIELDS, try_bad_request

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def good_tokens(shared_fleet):
    """The good request's greedy tokens with nothing else going on."""
    return [c.token_ids for c in shared_fleet.generate(*GOOD_REQUEST, timeout=180)]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=str)
def test_a_bad_request_is_refused_before_anything_is_queued_and_a_concurrent_good_one_is_unaffected(
    fleet, good_tokens, case
):
    out = try_bad_request(fleet, case)
    assert out.clear, f"expected {case.error} with {case.fragment!r}, got {out.error_type}: {out.message}"
    assert out.details["queued"] == 0
    assert (out.lost, out.duplicates) == (0, 0), out.details
    assert out.details["good_tokens"] == good_tokens


@pytest.mark.parametrize("field, values", INVALID_SAMPLING_FIELDS, ids=lambda v: str(v))
def test_invalid_sampling_values_are_refused_when_the_params_are_built(field, values):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.* is invalid: expected"):
        rollout.SamplingParams(**values)
