"""Bad JSONL rows are found when the data set loads (file:line), not at the rollout that draws them."""

import json
import logging

import pytest

from megatron_vespo.config.base import ConfigError, validate
from megatron_vespo.config.job import JobConfig
from megatron_vespo.data import PromptDataset, load_jsonl_prompts
from megatron_vespo.data.config import DataConfig

GOOD = json.dumps({"prompt": [1, 2, 3], "label": 1})


@pytest.mark.parametrize("row, words", [
    ({"prompt": [1, 2, 500], "label": 1}, ["outside the vocabulary [0, 256)", "500"]),
    ({"prompt": [], "label": 1}, ["non-empty list"]),
    ({"prompt": [1, "2"], "label": 1}, ["non-integer", "'2'"]),
    ({"prompt": [1, 2.5], "label": 1}, ["non-integer"]),
    ({"prompt": [1, True], "label": 1}, ["non-integer"]),
    ({"prompt": 7, "label": 1}, ["text or a non-empty list"]),
    ({"prompt": {"ids": [1]}, "label": 1}, ["text or a non-empty list"]),
    ({"prompt": [-1, 2], "label": 1}, ["outside the vocabulary"]),
    (42, ["must be a JSON object", "int"]),
    ([1, 2], ["must be a JSON object", "list"]),
    ({"prompt": "  ", "label": 1}, ["empty text"]),
])
def test_bad_rows_fail_at_load_naming_file_and_line(tmp_path, row, words):
    p = tmp_path / "d.jsonl"
    p.write_text(GOOD + "\n" + GOOD + "\n" + json.dumps(row) + "\n" + GOOD + "\n")
    with pytest.raises(ValueError) as err:
        load_jsonl_prompts(p, "prompt", "label", str.split, 64, vocab_size=256)
    assert f"{p}:3:" in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_from_config_checks_the_vocabulary(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(GOOD + "\n" + json.dumps({"prompt": [1, 300], "label": 0}) + "\n")
    cfg = DataConfig(source="jsonl", path=str(p))
    with pytest.raises(ValueError, match=r"d.jsonl:2: 'prompt' holds token ids outside the vocabulary \[0, 256\)"):
        PromptDataset.from_config(cfg, vocab_size=256)
    assert len(PromptDataset.from_config(cfg, vocab_size=301).prompts) == 2


def test_long_prompts_are_counted_and_warned_or_refused(tmp_path, caplog):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": list(range(1, n + 1)), "label": 0} for n in (3, 9, 4, 12)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="megatron_vespo.data.prompts"):
        prompts = load_jsonl_prompts(p, "prompt", "label", None, 5, vocab_size=100)
    assert [len(q.tokens) for q in prompts] == [3, 5, 4, 5]
    assert "2 of 4 prompts are longer than data.max_prompt_len=5 tokens (lines 2, 4)" in caplog.text
    with pytest.raises(ValueError, match=r"2 of 4 prompts are longer .*lines 2, 4.*data.on_long_prompt=truncate"):
        load_jsonl_prompts(p, "prompt", "label", None, 5, vocab_size=100, on_long_prompt="error")
    with pytest.raises(ConfigError, match="data.on_long_prompt"):
        validate(JobConfig, {"data": {"on_long_prompt": "drop"}})
