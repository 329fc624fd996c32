"""The OpenAI-compatible server on a real fleet, driven by the official `openai` client.

One module-scoped fleet (2 workers x 1 simulated device, tiny Qwen3 whose chat template also
renders `tools`) and one server on 127.0.0.1 serve every test; a second server with an api key
shares the same fleet. The test that shuts the fleet down runs last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import threading
import time

import httpx
import pytest
import ray

import rollout
from rollout.tokenizer import Tokenizer

from reliability.fault_worker import FaultyWorker

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.ray

CONFIG = dict(num_workers=2, devices_per_worker=1, accelerator="cpu", max_batch=8, max_seq_len=1024, decode_steps=4,
              bucket_bytes=64 << 10)
MODEL = "tiny"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOLS_PREFIX = "{%- if tools %}{{- '<tools>' + (tools | tojson) + '</tools>\\n' }}{%- endif %}\n"


@pytest.fixture(scope="module")
def checkpoint(tiny_qwen3, tmp_path_factory):
    """tiny_qwen3 with a chat template that also renders `tools` (so the test can see them)."""
    path = tmp_path_factory.mktemp("served") / "tiny"
    shutil.copytree(tiny_qwen3, path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = TOOLS_PREFIX + config["chat_template"]
    config_file.write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def server(ray_local, checkpoint, tmp_path_factory):
    # a persistent compilation cache lets the workers killed below restart without recompiling
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    srv = rollout.serve(
        checkpoint, port=0, served_model_name=MODEL, env_vars=cache, worker_class=FaultyWorker, **CONFIG
    )
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def keyed(server):
    """A second server on the same fleet, with an api key."""
    srv = rollout.serve(server.service, port=0, api_key="sekrit", served_model_name=MODEL)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_pretrained(checkpoint)


def greedy_reference(server, prompt, max_tokens=24, **kw):
    sampling = rollout.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
    return server.service.generate([prompt], sampling)[0]


def routed(server) -> int:
    return sum(w["routed_requests"] for w in server.service.status()["workers"])


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        if key.split("{")[0] == name and labels in key:
            total += float(value)
    return total


# -- basics --------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].weight_version == server.service.version


def test_health_reports_ok_and_version(server):
    body = httpx.get(server.url + "/health").json()
    assert body["status"] == "ok" and body["weight_version"] == server.service.version


def test_completion_equals_python_api_tokens_and_logprobs(client, server):
    prompt = [7, 8, 9, 10, 11]
    sampling = rollout.SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    ref = server.service.generate([prompt], sampling)[0]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.8, seed=3, logprobs=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    assert choice.token_ids == list(ref.token_ids)
    assert choice.text == ref.text
    assert choice.logprobs.token_logprobs == pytest.approx(list(ref.logprobs), abs=1e-6)
    assert choice.prompt_token_ids == prompt
    assert choice.weight_version == ref.weight_version
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 16


def test_chat_goes_through_template_with_tools_and_thinking_flag(client, server, tokenizer):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=8, temperature=0.0, tools=TOOLS,
        extra_body={"return_token_ids": True, "chat_template_kwargs": {"enable_thinking": False}})
    expected = tokenizer.apply_chat_template(messages, tools=TOOLS, enable_thinking=False, tokenize=True)
    choice = out.choices[0]
    assert choice.prompt_token_ids == expected
    assert "get_weather" in tokenizer.decode(choice.prompt_token_ids) and "<think>" in tokenizer.decode(expected)
    ref = greedy_reference(server, expected, max_tokens=8)
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.token_ids == list(ref.token_ids)


def test_chat_logprobs_equal_python_api(client, server, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0.7, seed=11,
                                         logprobs=True, extra_body={"ignore_eos": True})
    ref = server.service.generate([messages], rollout.SamplingParams(max_tokens=12, temperature=0.7, seed=11,
                                                                     ignore_eos=True))[0]
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(list(ref.logprobs), abs=1e-6)
    assert "".join(c.token for c in content) == tokenizer.decode(ref.token_ids, skip_special_tokens=False)


# -- top-k alternatives ---------------------------------------------------------------------------


def test_completion_top_logprobs_equal_python_api(client, server, tokenizer):
    prompt = [7, 8, 9, 10, 11]
    sampling = rollout.SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True, top_logprobs=3)
    ref = server.service.generate([prompt], sampling)[0]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.8, seed=3, logprobs=3,
                                    extra_body={"ignore_eos": True})
    top = out.choices[0].logprobs.top_logprobs
    assert len(top) == 8
    for row, ids, lps in zip(top, ref.top_logprobs.token_ids, ref.top_logprobs.logprobs):
        expected = {}
        for i, lp in zip(ids.tolist(), lps.tolist()):
            expected.setdefault(tokenizer.decode([i], skip_special_tokens=False), lp)
        assert row == pytest.approx(expected, abs=1e-6)


def test_chat_top_logprobs_list_the_most_likely_tokens_led_by_the_greedy_one(client, tokenizer):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=6,
                                         temperature=0.0, logprobs=True, top_logprobs=4,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    content = choice.logprobs.content
    assert [len(c.top_logprobs) for c in content] == [4] * 6
    for c, token_id in zip(content, choice.token_ids):
        first = c.top_logprobs[0]
        assert first.token == c.token == tokenizer.decode([token_id], skip_special_tokens=False)
        assert first.logprob == pytest.approx(c.logprob, abs=1e-6) and first.bytes == c.bytes
        assert [a.logprob for a in c.top_logprobs] == sorted((a.logprob for a in c.top_logprobs), reverse=True)


def test_streamed_chat_top_logprobs_equal_the_whole_response(client):
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Count."}], max_tokens=10, temperature=0.9,
                   seed=5, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**request).choices[0].logprobs.content
    streamed = [c for chunk in client.chat.completions.create(stream=True, **request) for choice in chunk.choices
                if choice.logprobs for c in choice.logprobs.content]
    assert [[(a.token, a.logprob) for a in c.top_logprobs] for c in streamed] == \
        [[(a.token, pytest.approx(a.logprob, abs=1e-6)) for a in c.top_logprobs] for c in whole]


# -- agents: tool_choice, token ids back ---------------------------------------------------------


def test_a_trajectory_over_http_holds_exactly_the_sampled_ids(client, tokenizer):
    """rollout.Trajectory driven through /v1/completions with token-id prompts (an external agent's
    way): each turn's ids come back with return_token_ids and are appended as they are."""
    traj = rollout.Trajectory(tokenizer, [{"role": "user", "content": "What is 3 + 4?"}])
    sampled = []
    for turn in range(2):
        choice = client.completions.create(model=MODEL, prompt=traj.prompt(), max_tokens=6, temperature=1.0,
                                           seed=turn, logprobs=0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
        traj.add_sampled(choice.token_ids, logprobs=choice.logprobs.token_logprobs,
                         weight_versions=choice.token_versions, text=choice.text,
                         prompt_token_ids=choice.prompt_token_ids)
        traj.add_message({"role": "tool", "content": f"result {turn}"})
        sampled.append(choice.token_ids)
    spans = [t for t in traj.turns if t.role == "assistant"]
    model_ids = [[i for i, m in zip(traj.token_ids[t.start:t.end], traj.loss_mask[t.start:t.end]) if m] for t in spans]
    assert model_ids == sampled
    assert sum(traj.loss_mask) == sum(len(s) for s in sampled)



def test_tool_choice_decides_which_tools_the_template_renders(client, tokenizer):
    tools = [*TOOLS, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Hi"}]

    def rendered(tool_choice):
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, tools=tools,
                                             tool_choice=tool_choice, extra_body={"return_token_ids": True})
        return tokenizer.decode(out.choices[0].prompt_token_ids, skip_special_tokens=False)

    assert "get_weather" in rendered("auto") and "get_time" in rendered("auto")
    assert "<tools>" not in rendered("none")
    named = rendered({"type": "function", "function": {"name": "get_time"}})
    assert "get_time" in named and "get_weather" not in named
    with pytest.raises(openai.BadRequestError, match="get_date"):
        rendered({"type": "function", "function": {"name": "get_date"}})


def test_returned_token_ids_continue_the_conversation_without_retokenizing(client, server, tokenizer):
    """Turn 2 sent as turn 1's ids plus a tool message: its prompt starts with exactly those ids."""
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=6, temperature=0.0,
        extra_body={"return_token_ids": True}).choices[0]
    sampled = first.prompt_token_ids + first.token_ids
    tool = {"role": "tool", "content": "sunny"}
    second = client.chat.completions.create(
        model=MODEL, messages=[tool], max_tokens=6, temperature=0.0,
        extra_body={"prompt_token_ids": sampled, "return_token_ids": True}).choices[0]
    assert second.prompt_token_ids[: len(sampled)] == sampled
    added = tokenizer.decode(second.prompt_token_ids[len(sampled):], skip_special_tokens=False)
    closing = "" if first.finish_reason == "stop" else "<|im_end|>"  # a turn cut by max_tokens is closed
    assert added == closing + "\n<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n"
    assert second.token_ids == list(greedy_reference(server, second.prompt_token_ids, max_tokens=6).token_ids)
    # the same ids as a completions prompt (a list of ints, as OpenAI's API allows) give the same tokens
    again = client.completions.create(model=MODEL, prompt=second.prompt_token_ids, max_tokens=6, temperature=0.0,
                                      extra_body={"return_token_ids": True}).choices[0]
    assert again.prompt_token_ids == second.prompt_token_ids and again.token_ids == second.token_ids


# -- streaming -----------------------------------------------------------------------------------


def test_streamed_completion_adds_up_to_the_non_streamed_one(client, server):
    prompt = "The quick brown fox"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.0, stream=True,
                                            extra_body={"ignore_eos": True, "return_token_ids": True}))
    assert len(chunks) > 1  # tokens arrive in pieces, not at the end
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [t for c in chunks for t in c.choices[0].token_ids] == full.choices[0].token_ids
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].weight_version == server.service.version for c in chunks if c.choices[0].token_ids)


def test_stream_ends_with_done_and_usage_chunk(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert sum(len(c["choices"][0]["delta"].get("content", "")) for c in chunks[:-1]) > 0


def test_n_samples_stream_and_not(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3, seed=5,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    out = client.completions.create(**kw)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.choices}) > 1  # independent samples
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.token_ids
    assert streamed == {c.index: c.token_ids for c in out.choices}


def test_several_prompts_stream_into_their_own_choices(client):
    kw = dict(model=MODEL, prompt=[[7, 8], [9, 10, 11]], max_tokens=10, temperature=0.0, n=2,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    out = client.completions.create(**kw)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    streamed: dict[int, list[int]] = {i: [] for i in range(4)}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.token_ids
    assert streamed == {c.index: c.token_ids for c in out.choices}
    assert out.choices[2].prompt_token_ids == [9, 10, 11] and out.usage.completion_tokens == 40


def test_seed_reproduces_and_other_seed_differs(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].token_ids

    assert sample(42) == sample(42)
    assert sample(42) != sample(43)


def test_stop_string_cuts_text_in_stream_and_not(client, server):
    prompt = "The quick brown fox"
    ref = greedy_reference(server, prompt, max_tokens=30, ignore_eos=True)
    stop = ref.text[len(ref.text) // 2: len(ref.text) // 2 + 3]
    expected = ref.text[: ref.text.find(stop)]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=30, temperature=0.0, stop=[stop], extra_body={"ignore_eos": True})
    out = client.completions.create(**kw).choices[0]
    assert out.text == expected and out.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == expected  # nothing of the stop string leaked into earlier chunks


def test_stop_token_ids_end_the_sample(client, server):
    ref = greedy_reference(server, [5, 6, 7], max_tokens=20, ignore_eos=True)
    stop_id = ref.token_ids[4]
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=20, temperature=0.0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [stop_id],
                                                "return_token_ids": True}).choices[0]
    assert out.token_ids == list(ref.token_ids[: ref.token_ids.index(stop_id) + 1])
    assert out.finish_reason == "stop"


def test_chat_response_format_json_schema_gives_json_that_validates(client):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "rain": {"type": "boolean"}},
              "required": ["city", "rain"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], max_tokens=40, n=2, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_completion_regex_extra_is_followed_in_stream_and_not(client):
    pattern = "(up|down)-[0-9]"
    request = dict(model=MODEL, prompt="Go", max_tokens=8, seed=1, extra_body={"regex": pattern})
    whole = client.completions.create(**request).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**request, stream=True) if c.choices)
    assert re.fullmatch(pattern, whole) and streamed == whole


# -- errors and auth -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=5000), "prompt"),  # prompt + max_tokens > max_seq_len
    (dict(logprobs=21), "logprobs"),  # more alternatives than OpenAI's limit of 20
    (dict(extra_body={"top_k": -5}), "top_k"),
    (dict(prompt=[10**7]), "prompt"),  # out of the vocabulary
    (dict(extra_body={"response_format": {"type": "yaml"}}), "response_format"),
    (dict(extra_body={"regex": "a+", "grammar": 'start: "a"'}), "regex"),  # two constraints
])
def test_invalid_values_get_400_and_queue_nothing(client, server, kwargs, param):
    before = routed(server)
    request = dict(model=MODEL, prompt="Hello", max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and "Traceback" not in error["message"]
    assert routed(server) == before


def test_chat_top_logprobs_over_the_limit_refused_with_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match=r"top_logprobs=21 .*\[0, 20\]"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=21)


def test_a_regex_that_does_not_compile_gets_400_saying_why(client):
    with pytest.raises(openai.BadRequestError, match="regex could not be compiled"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"regex": "(unclosed"})


def test_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-5", prompt="Hello", max_tokens=4)
    assert info.value.body["code"] == "model_not_found" and MODEL in info.value.body["message"]


def test_malformed_body_gets_openai_error_json(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": "hello"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_api_key_guards_every_v1_route(keyed, checkpoint):
    url = keyed.url
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/v1/status", None),
                               ("POST", "/v1/weights", {"source": str(checkpoint)}),
                               ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, url + path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
    assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].weight_version >= 0
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(url + "/health").status_code == 200  # open: load balancers probe it


def test_binding_beyond_loopback_without_key_is_refused(checkpoint, capsys):
    with pytest.raises(ValueError, match="api key"):
        rollout.serve(checkpoint, host="0.0.0.0", port=0)  # refused before any fleet starts
    from rollout.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", str(checkpoint), "--host", "0.0.0.0"])
    assert "refusing to bind '0.0.0.0' without an api key" in str(info.value.code)
    assert "--api-key" in str(info.value.code)


# -- admin, metrics, cancellation ----------------------------------------------------------------


def test_status_route_is_rollout_status(server):
    body = httpx.get(server.url + "/v1/status").json()
    assert body["version"] == server.service.version
    assert [w["index"] for w in body["workers"]] == [0, 1]


def test_client_disconnect_cancels_the_request(client, server):
    cancelled = metric(server, "rollout_requests_cancelled_total")
    tokens = {w["index"]: w["tokens_generated"] for w in server.service.status()["workers"]}
    stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=900, temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while metric(server, "rollout_requests_cancelled_total") < cancelled + 1 or any(
            w["active_slots"] for w in server.service.status()["workers"]):
        assert time.monotonic() < deadline, "the request kept running after its client went away"
        time.sleep(0.1)
    status = server.service.status()["workers"]
    generated = sum(w["tokens_generated"] - tokens[w["index"]] for w in status)
    assert generated < 900  # stopped early, not run to max_tokens


def test_sync_through_http_while_streams_run(server, client, tiny_qwen3_perturbed, checkpoint):
    old = server.service.version
    prompt = [3, 4, 5, 6]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=120, temperature=0.0, stream=True,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    before = greedy_reference(server, prompt, max_tokens=120, ignore_eos=True)
    results: list[list] = [[] for _ in range(3)]
    started = threading.Barrier(4)

    def consume(i):
        for n, chunk in enumerate(client.completions.create(**kw)):
            results[i].append(chunk.choices[0])
            if n == 0:
                started.wait()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first tokens
    r = httpx.post(server.url + "/v1/weights", json={"source": str(tiny_qwen3_perturbed)}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == old + 1 and r.json()["sync"]["ok"]
    for t in threads:
        t.join(timeout=300)
    for chunks in results:  # drain policy: streams in flight finish on the weights they began with
        assert {v for c in chunks for v in c.token_versions} == {old}
        assert [t for c in chunks for t in c.token_ids] == list(before.token_ids)
    after = client.completions.create(model=MODEL, prompt=prompt, max_tokens=120, temperature=0.0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
    assert after.weight_version == old + 1
    assert after.token_ids == list(greedy_reference(server, prompt, max_tokens=120, ignore_eos=True).token_ids)
    assert after.token_ids != list(before.token_ids)
    assert metric(server, "rollout_weight_version") == old + 1
    # restore the served weights for later tests
    assert httpx.post(server.url + "/v1/weights", json={"source": str(checkpoint)}, timeout=300).json()["version"] == old + 2


def test_bad_sync_source_gets_400_and_keeps_version(server):
    version = server.service.version
    r = httpx.post(server.url + "/v1/weights", json={"source": "/nonexistent/checkpoint"}, timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    assert server.service.version == version


def test_metrics_are_prometheus_text_with_the_fleet_numbers(server):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("rollout_requests_total", "rollout_prompt_tokens_total", "rollout_generation_tokens_total",
                 "rollout_queue_depth", "rollout_active_slots", "rollout_time_to_first_token_seconds_bucket",
                 "rollout_time_per_output_token_seconds_bucket", "rollout_weight_version",
                 "rollout_sync_phase_seconds"):
        assert name in text, name
    assert metric(server, "rollout_requests_total", 'endpoint="completions",status="200"') >= 5
    assert metric(server, "rollout_requests_total", 'status="400"') >= 1
    assert metric(server, "rollout_time_to_first_token_seconds_count") >= 1
    assert metric(server, "rollout_sync_phase_seconds", 'phase="commit"') > 0
    mirrored = [m for m in vars(server.metrics).values() if hasattr(m, "ray")]
    assert len(mirrored) == 13 and all(m.ray is not None for m in mirrored)  # fed to Ray's metrics too


def test_worker_death_before_the_first_token_resends_the_request(server):
    svc = server.service
    sampling = rollout.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = svc.generate([[9, 8, 7]], sampling)[0]
    for worker in range(2):  # whichever gets the request stalls before generating
        ray.get(svc.workers[worker].inject_fault.remote("generate", delay_s=2.0))

    async def run():
        stream = svc.generate_stream([9, 8, 7], sampling)
        task = asyncio.ensure_future(_drain(stream))
        while stream.worker is None:
            await asyncio.sleep(0.01)
        first = stream.worker
        ray.kill(svc.workers[first], no_restart=False)
        await task
        return stream, first

    try:
        stream, first = asyncio.run(run())
    finally:
        for worker in range(2):
            with contextlib.suppress(Exception):
                ray.get(svc.workers[worker].clear_faults.remote(), timeout=30)
    assert stream.worker != first  # re-sent to the other worker
    out = stream.completions()[0]
    assert out.token_ids == ref.token_ids and out.text == ref.text and out.finish_reason == "length"
    assert svc.wait_for_workers(180)


@pytest.mark.parametrize("regex", [None, "x[a-z ]+"])  # constrained: the continuation resumes the regex, not restarts it
def test_worker_death_mid_stream_continues_each_sample_elsewhere(server, regex):
    svc = server.service
    assert svc.wait_for_workers(180)
    body = {"model": MODEL, "prompt": [4, 5, 6], "max_tokens": 300, "temperature": 0, "n": 2, "stream": True,
            "ignore_eos": True, "return_token_ids": True, "stop": ["zzzz"], "regex": regex}
    before = routed(server)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        events = (line[len("data: "):] for line in r.iter_lines() if line.startswith("data: "))
        chunks = [json.loads(next(events))]
        busy = [w["index"] for w in svc.status()["workers"] if w["inflight_requests"]]
        ray.kill(svc.workers[busy[0]], no_restart=False)
        rest = list(events)
    assert rest[-1] == "[DONE]" and not any("error" in json.loads(e) for e in rest[:-1])
    assert routed(server) - before == 1 + 2  # the request, then one continuation per sample
    chunks += [json.loads(e) for e in rest[:-1]]
    ref = svc.generate([[4, 5, 6]], rollout.SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True, regex=regex))[0]
    for index in (0, 1):  # every token once, text as if one worker had made it all
        choices = [c for chunk in chunks for c in chunk["choices"] if c["index"] == index]
        assert [t for c in choices for t in c["token_ids"]] == list(ref.token_ids)
        assert "".join(c["text"] for c in choices) == ref.text
        assert choices[-1]["finish_reason"] == "length"
    assert svc.wait_for_workers(180)


async def _drain(stream):
    async for _ in stream:
        pass


def test_after_fleet_shutdown_requests_get_503(server, client):
    """Last: it shuts the module's fleet down."""
    server.service.shutdown()
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert info.value.status_code == 503
    assert httpx.get(server.url + "/health").status_code == 503
