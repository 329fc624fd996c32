"""`rollout bench structured` runs end to end on the tiny model and reports what it measured."""

from __future__ import annotations

import json

from rollout.bench import structured


def test_the_trained_tokenizer_has_exactly_the_asked_size():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(structured.train_tokenizer(2000))
    assert tokenizer.get_vocab_size() == 2000 and tokenizer.token_to_id("<|endoftext|>") == 0


def test_the_tiny_run_times_both_sides_and_every_completed_json_sample_parses(tmp_path):
    out = tmp_path / "structured.json"
    assert structured.main(["--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["free_tok_s"] > 0 and r["regex_tok_s"] > 0
        assert r["json_parsed"] == r["json_finished"]
