"""Token-exact multi-turn trajectories: a conversation held as the token ids the model saw and made.

    traj = rollout.Trajectory(service.tokenizer, [{"role": "user", "content": "What is 17 * 23?"}])
    out = rollout.generate([traj.prompt()], sampling)[0]     # token ids in, token ids out
    traj.add_model_turn(out)                                 # exactly out.token_ids, never re-tokenized
    traj.add_message({"role": "tool", "content": "391"})     # what the chat template adds for it
    traj.token_ids, traj.loss_mask, traj.logprobs, traj.weight_versions   # for the trainer

Re-rendering a conversation from its text at every turn (what a chat API does) re-tokenizes what
the model sampled, and the ids can differ from the sampled ones (a word the model made of two
tokens comes back as one), so the trainer would score tokens the model never produced. Here:

- a model turn appends the template's generation prompt (its rendering of the messages with
  `add_generation_prompt=True` minus without), exactly the sampled ids, then what the template
  writes after an assistant message's content (e.g. `<|im_end|>\\n`), less the end-of-sequence
  token the model already sampled (read off a stand-in assistant message, as the HTTP server's
  `prompt_token_ids` continuation does: rollout.server.translate.continued_prompt);
- an environment, tool or user turn appends the tokens of what the template adds for that
  message: its rendering of messages[:i+1] minus its rendering of messages[:i]. A template whose
  rendering of a longer conversation does not start with that of the shorter one (e.g. one that
  rewrites earlier turns) is not prefix-stable, and is refused (TemplateNotPrefixStableError).

Only template text is tokenized; sampled ids are copied. Per token: `loss_mask` (1 for sampled
tokens, 0 for everything else), `logprobs` (the sampler's; 0.0 where the mask is 0) and
`weight_versions` (the version that sampled it; -1 where the mask is 0).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# a stand-in assistant content: the template's text after it is what closes an assistant turn
_STAND_IN = "\u2063rollout-trajectory-assistant\u2063"


class TemplateNotPrefixStableError(ValueError):
    """The chat template renders a longer conversation as something other than the shorter one
    plus more text, so a turn's tokens cannot be appended without re-rendering earlier ones."""


@dataclasses.dataclass(frozen=True)
class Turn:
    """One turn's tokens: token_ids[start:end] of the trajectory."""

    role: str  # "assistant" for a model turn (generation prompt, sampled ids, closing), else the message's
    start: int
    end: int


class Trajectory:
    """A conversation as token ids, with a loss mask, logprobs and weight versions per token.

    `tokenizer`: a rollout Tokenizer (`service.tokenizer`, `rollout.tokenizer.Tokenizer.
    from_pretrained(path)`) or anything with `apply_chat_template(messages, add_generation_prompt,
    tokenize=False, **kw)`, `encode(text)`, `decode(ids, skip_special_tokens=False)` and
    `eos_token_ids`. `messages`: the opening messages (system, user, ...). `template_kwargs`
    reach every rendering of the chat template (tools=[...], enable_thinking=False, ...).
    """

    def __init__(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]], **template_kwargs: Any):
        if not messages:
            raise ValueError("a Trajectory starts from at least one message (e.g. the user's request); got none")
        self.tokenizer = tokenizer
        self.template_kwargs = template_kwargs
        self.messages: list[dict[str, Any]] = [dict(m) for m in messages]
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.weight_versions: list[int] = []
        self.turns: list[Turn] = []
        self._append(self._encode(self._render(self.messages)), "prompt")

    # -- reading ----------------------------------------------------------------------------------

    def prompt(self) -> list[int]:
        """The ids to generate the next model turn from: the trajectory plus the template's
        generation prompt (appended for real by `add_model_turn`)."""
        return self.token_ids + self._generation_prompt()

    @property
    def model_token_count(self) -> int:
        return sum(self.loss_mask)

    def copy(self) -> Trajectory:
        """An independent copy (e.g. one per sample of a group that shares this history)."""
        return copy.deepcopy(self)

    # -- growing ------------------------------------------------------------------------------------

    def add_model_turn(self, completion: Any, message: Mapping[str, Any] | None = None) -> Trajectory:
        """Append a model turn: the generation prompt, exactly `completion.token_ids` (mask 1, with
        its logprobs and token_versions), then the template's closing of an assistant turn.

        `completion`: a rollout Completion sampled from `prompt()` (`add_sampled` takes the same
        as plain values, e.g. from an HTTP reply). `message`: the assistant message later
        renderings of the conversation use (default: its text as content; pass the parsed one
        with `tool_calls` where the template renders calls).
        """
        return self.add_sampled(
            completion.token_ids, logprobs=completion.logprobs, weight_versions=completion.token_versions,
            text=completion.text, prompt_token_ids=completion.prompt_token_ids, message=message,
        )

    def add_sampled(
        self,
        token_ids: Sequence[int],
        *,
        logprobs: Sequence[float] | None = None,
        weight_versions: Sequence[int] | None = None,
        text: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        message: Mapping[str, Any] | None = None,
    ) -> Trajectory:
        """`add_model_turn` from plain values: the sampled `token_ids` (e.g. an HTTP choice's
        `token_ids` with `return_token_ids`), their logprobs and weight versions if known, the
        turn's text (for the default assistant message; decoded from the ids if not given) and
        the prompt they were sampled from, checked against `prompt()` if given."""
        prompt = self.prompt()
        if prompt_token_ids is not None and [int(t) for t in prompt_token_ids] != prompt:
            raise ValueError(
                f"the completion was sampled from a prompt of {len(prompt_token_ids)} tokens that is not this "
                f"trajectory's prompt() ({len(prompt)} tokens): generate from traj.prompt() and add its completion "
                "before adding anything else"
            )
        ids = [int(t) for t in token_ids]
        if logprobs is not None and len(logprobs) != len(ids):
            raise ValueError(f"{len(logprobs)} logprobs for {len(ids)} sampled tokens: expected one per token")
        start = len(self.token_ids)
        self._append(prompt[start:], None)
        self._append(ids, None, model=True, logprobs=logprobs, versions=list(weight_versions or ()))
        self._append(self._encode(self._closing(ids)), None)
        self.turns.append(Turn("assistant", start, len(self.token_ids)))
        if message is None:
            content = text if text is not None else self.tokenizer.decode(ids, skip_special_tokens=True)
            message = {"role": "assistant", "content": content}
        self.messages.append(dict(message))
        return self

    def add_message(self, message: Mapping[str, Any]) -> Trajectory:
        """Append an environment, tool or user turn: the tokens of what the chat template adds
        for `message` (mask 0)."""
        if not isinstance(message.get("role"), str):
            raise ValueError(f"a message needs a 'role' string, like {{'role': 'tool', 'content': ...}}; got {message!r}")
        before = self._render(self.messages)
        after = self._render([*self.messages, dict(message)])
        added = self._extension(before, after, f"a {message['role']!r} message")
        self.messages.append(dict(message))
        self._append(self._encode(added), str(message["role"]))
        return self

    # -- the chat template ----------------------------------------------------------------------------

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return str(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False, **self.template_kwargs
        ))

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)] if text else []

    def _generation_prompt(self) -> list[int]:
        plain = self._render(self.messages)
        prompted = self._render(self.messages, generation_prompt=True)
        return self._encode(self._extension(plain, prompted, "the generation prompt"))

    def _closing(self, sampled: list[int]) -> str:
        """What the template writes after an assistant message's content, less the end-of-sequence
        token the model sampled last (if it did: a stop string or the length limit did not)."""
        text = self._render([*self.messages, {"role": "assistant", "content": _STAND_IN}])
        at = text.rfind(_STAND_IN)
        if at < 0:
            raise TemplateNotPrefixStableError(
                "the chat template does not write an assistant message's content verbatim, so what closes a model "
                "turn cannot be read off it; use a template that renders assistant content as given"
            )
        closing = text[at + len(_STAND_IN):]
        if sampled and sampled[-1] in set(self.tokenizer.eos_token_ids):
            closing = closing.removeprefix(self.tokenizer.decode([sampled[-1]], skip_special_tokens=False))
        return closing

    @staticmethod
    def _extension(before: str, after: str, what: str) -> str:
        if not after.startswith(before):
            at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
            raise TemplateNotPrefixStableError(
                f"the chat template is not prefix-stable: adding {what} changes what it renders for the conversation "
                f"before it (first difference at character {at}: {before[at:at + 40]!r} became "
                f"{after[at:at + 40]!r}), so the new turn cannot be appended as tokens without re-tokenizing "
                "earlier ones. Use a template that renders earlier turns the same whatever follows (e.g. without "
                "dropping earlier reasoning), or pass template kwargs that make it so"
            )
        return after[len(before):]

    def _append(self, ids: list[int], role: str | None, *, model: bool = False,
                logprobs: Sequence[float] | None = None, versions: Sequence[int] = ()) -> None:
        start = len(self.token_ids)
        self.token_ids += ids
        self.loss_mask += [1 if model else 0] * len(ids)
        if model:
            self.logprobs += [float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids)
            self.weight_versions += [int(v) for v in versions] if len(versions) == len(ids) else [-1] * len(ids)
        else:
            self.logprobs += [0.0] * len(ids)
            self.weight_versions += [-1] * len(ids)
        if role is not None and ids:
            self.turns.append(Turn(role, start, len(self.token_ids)))
