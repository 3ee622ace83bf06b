"""tools/staleness_task.py: the addition-with-scratchpad task prepares a model, disjoint splits and labels
the scratchpad reward scores."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

pytest.importorskip("transformers")


def test_prepare_writes_model_and_disjoint_labelled_splits(tmp_path):
    import staleness_task as st

    from megatron_vespo.rewards import get_reward
    from megatron_vespo.types import Sample

    summary = st.prepare(tmp_path, operands=3, sft_steps=2, n_train=16, n_eval=8, seed=3)
    assert summary["params"] == 3_351_936 and summary["eval_prompts"] == 8  # the addition model, 16 tokens
    assert (tmp_path / "sft" / "config.json").exists() and (tmp_path / "sft" / "tokenizer.json").exists()
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 16 and len(held) == 8
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # held-out means disjoint
    for row in train + held:
        ops = [int(x) for x in row["prompt"].rstrip("=").split("+")]
        sums = [sum(ops[:i + 1]) for i in range(1, len(ops))]
        assert row["label"] == ",".join(map(str, sums))
        right = Sample(prompt_tokens=[1], response_tokens=[2], metadata={"response_text": row["label"]})
        assert get_reward("scratchpad")(right, row["label"]) == 1.0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    ids = tok.encode(held[0]["prompt"] + held[0]["label"], add_special_tokens=False)
    assert len(ids) == len(held[0]["prompt"] + held[0]["label"])  # one token per character
    assert tok.decode(ids) == held[0]["prompt"] + held[0]["label"]
