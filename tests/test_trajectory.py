"""rollout.Trajectory: a multi-turn tool conversation held as token ids, token-exact.

The engine samples every model turn from `traj.prompt()` (token ids in, token ids out, as
`rollout.generate` takes them); the expected ids are built here by hand from the tiny
checkpoint's ChatML template, and the tokenizer records every text it is asked to encode, so
the test shows that only template text was tokenized and every sampled id was copied as is.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from rollout import SamplingParams, TemplateNotPrefixStableError, Trajectory
from rollout.engine import EngineConfig
from rollout.engine.native.engine import Engine

OPENING = [{"role": "system", "content": "You can call a calculator."}, {"role": "user", "content": "What is 17 * 23?"}]


class RecordingTokenizer:
    """The engine's tokenizer, recording the texts it encodes."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.encoded: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return self._tokenizer.encode(text)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(tiny_qwen3, EngineConfig(max_batch=2, max_seq_len=512, decode_steps=4)) as eng:
        yield eng


def chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_five_turn_tool_conversation_is_sampled_ids_plus_template_additions(engine):
    tokenizer = RecordingTokenizer(engine.tokenizer)
    traj = Trajectory(tokenizer, OPENING)
    opening = "".join(chatml(m["role"], m["content"]) for m in OPENING)
    expected, allowed = tokenizer.encode(opening), {opening}
    mask, samples = [0] * len(expected), []
    for turn in range(5):
        out = engine.generate([traj.prompt()], SamplingParams(max_tokens=6, temperature=1.0, seed=turn, ignore_eos=True))[0]
        traj.add_model_turn(out)
        reply = chatml("tool", f"result {turn}")
        pieces = ["<|im_start|>assistant\n", None, "<|im_end|>\n", reply]  # the length limit ended the turn
        traj.add_message({"role": "tool", "content": f"result {turn}"})
        for piece in pieces:
            ids = list(out.token_ids) if piece is None else engine.tokenizer.encode(piece)
            expected += ids
            mask += [1 if piece is None else 0] * len(ids)
            allowed |= {piece} if piece is not None else set()
        samples.append(out)
    assert traj.token_ids == expected
    assert traj.loss_mask == mask
    assert [lp for lp, m in zip(traj.logprobs, traj.loss_mask) if m] == [lp for o in samples for lp in o.logprobs]
    assert {v for v, m in zip(traj.weight_versions, traj.loss_mask) if m} == {engine.version}
    assert set(tokenizer.encoded) <= allowed  # only template text was ever tokenized
    # the control: re-tokenizing the conversation's text would not give the sampled ids back
    assert engine.tokenizer.encode(engine.tokenizer.decode(traj.token_ids, skip_special_tokens=False)) != traj.token_ids
    assert [t.role for t in traj.turns] == ["prompt"] + ["assistant", "tool"] * 5


def test_a_model_turn_ending_in_eos_gets_only_the_rest_of_the_closing(engine):
    traj = Trajectory(engine.tokenizer, OPENING)
    out = engine.generate([traj.prompt()], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    eos = engine.tokenizer.token_to_id("<|im_end|>")
    stopped = dataclasses.replace(out, token_ids=(*out.token_ids, eos), logprobs=(*out.logprobs, -0.25),
                                  token_versions=(*out.token_versions, 0), finish_reason="stop")
    before = len(traj.token_ids)
    traj.add_model_turn(stopped)
    generation = engine.tokenizer.encode("<|im_start|>assistant\n")
    assert traj.token_ids[before:] == generation + list(stopped.token_ids) + engine.tokenizer.encode("\n")


def test_a_completion_of_another_prompt_is_refused(engine):
    traj = Trajectory(engine.tokenizer, OPENING)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0))[0]
    with pytest.raises(ValueError, match="not this trajectory's prompt"):
        traj.add_model_turn(out)


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_it(engine):
    tokenizer = copy.copy(engine.tokenizer)
    tokenizer.chat_template = "{{- messages | length }} messages\n" + engine.tokenizer.chat_template
    traj = Trajectory(tokenizer, OPENING)
    with pytest.raises(TemplateNotPrefixStableError, match=r"not prefix-stable.*'tool' message"):
        traj.add_message({"role": "tool", "content": "391"})
