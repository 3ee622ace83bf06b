"""Prompt data sets (resumable order, clear file errors) and reward functions."""

import json

import pytest

from megatron_vespo.config.job import JobConfig
from megatron_vespo.data import PromptDataset, load_jsonl_prompts, synthetic_prompts
from megatron_vespo.rewards import get_reward, register_reward
from megatron_vespo.types import Sample


def test_synthetic_prompts_are_seeded_and_labelled():
    a = synthetic_prompts(8, vocab_size=64, prompt_len=5, seed=3)
    b = synthetic_prompts(8, vocab_size=64, prompt_len=5, seed=3)
    assert [p.tokens for p in a] == [p.tokens for p in b]
    assert all(p.tokens[0] == p.label and 1 <= p.label <= 4 and len(p.tokens) == 5 for p in a)


def test_dataset_resume_continues_where_it_stopped():
    prompts = synthetic_prompts(10, 64, 4)
    ds = PromptDataset(prompts, seed=1)
    first = ds.next_batch(7)
    state = ds.state_dict()
    expected = ds.next_batch(8)  # crosses the epoch boundary
    resumed = PromptDataset(synthetic_prompts(10, 64, 4), seed=1)
    resumed.load_state_dict(state)
    assert [p.index for p in resumed.next_batch(8)] == [p.index for p in expected]
    assert sorted(p.index for p in first + expected[:3]) == list(range(10))  # one epoch = a permutation
    with pytest.raises(ValueError, match="saved for 10 prompts"):
        PromptDataset(synthetic_prompts(3, 64, 4)).load_state_dict(state)


def test_from_config_synthetic():
    ds = PromptDataset.from_config(JobConfig().data, vocab_size=128)
    assert len(ds.prompts) == JobConfig().data.num_prompts


def test_jsonl_loading_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "a b c", "label": "2"}) + "\n\n" + json.dumps({"prompt": [5, 6], "label": 1})
                 + "\n")
    prompts = load_jsonl_prompts(p, "prompt", "label", lambda s: [len(w) for w in s.split()], 2)
    assert [q.tokens for q in prompts] == [[1, 1], [5, 6]] and prompts[0].label == "2" and prompts[1].label == 1
    bad = tmp_path / "bad.jsonl"
    # a row without the label key is an error naming file, line and key (every reward needs the label)
    bad.write_text('{"prompt": [1, 2], "label": 3}\n{"prompt": [4], "answer": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing key 'label' \(data.label_key\); keys present: "
                                         r"\['answer', 'prompt'\]"):
        load_jsonl_prompts(bad, "prompt", "label", str.split, 8)
    # token-id prompts need no tokenizer; text prompts without one are refused with the line
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"prompt": [7, 8, 9], "label": 1}\n')
    assert load_jsonl_prompts(ids, "prompt", "label", None, 2)[0].tokens == [7, 8]
    with pytest.raises(ValueError, match=r"d.jsonl:1: 'prompt' is text but there is no tokenizer"):
        load_jsonl_prompts(p, "prompt", "label", None, 8)
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key 'prompt'"):
        load_jsonl_prompts(bad, "prompt", "label", str.split, 8)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        load_jsonl_prompts(bad, "prompt", "label", str.split, 8)
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_jsonl_prompts(tmp_path / "none.jsonl", "prompt", "label", str.split, 8)


def test_rewards():
    s = Sample(prompt_tokens=[3, 9], response_tokens=[3, 3, 7, 3])
    assert get_reward("target_token")(s, 3) == 0.75
    with pytest.raises(ValueError, match="target_token"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(lambda s, y: 0.0)


def test_math_reward_uses_math_verify():
    pytest.importorskip("math_verify")
    right = Sample(prompt_tokens=[1], response_tokens=[2], metadata={"response_text": "so it is \\boxed{0.5}"})
    wrong = Sample(prompt_tokens=[1], response_tokens=[2], metadata={"response_text": "\\boxed{3}"})
    assert get_reward("math")(right, "\\frac{1}{2}") == 1.0
    assert get_reward("math")(wrong, "\\frac{1}{2}") == 0.0
    with pytest.raises(ValueError, match="response_text"):
        get_reward("math")(Sample(prompt_tokens=[1], response_tokens=[2]), "1")


def test_jsonl_source_without_path_is_a_config_error():
    from megatron_vespo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.source=jsonl reads prompts from a file: set data.path"):
        load_config(JobConfig, None, ["data.source=jsonl"])
    assert load_config(JobConfig, None, ["data.source=jsonl", "data.path=p.jsonl"]).data.path == "p.jsonl"


def test_math_reward_works_off_the_main_thread():
    """The async loop scores in a Ray actor's thread, where math-verify's signal timeouts raise."""
    import threading

    pytest.importorskip("math_verify")
    from megatron_vespo.rewards import get_reward
    from megatron_vespo.types import Sample

    fn = get_reward("math")
    out = {}

    def score():
        out["right"] = fn(Sample(prompt_tokens=[1], response_tokens=[2], metadata={"text": "42"}), "42")
        out["wrong"] = fn(Sample(prompt_tokens=[1], response_tokens=[2], metadata={"text": "41"}), "42")
    t = threading.Thread(target=score)
    t.start()
    t.join(60)
    assert out == {"right": 1.0, "wrong": 0.0}


def test_scratchpad_reward_scores_characters_position_wise():
    """The staleness task's reward: characters right, over the longer of response and label."""
    def score(text):
        return get_reward("scratchpad")(Sample(prompt_tokens=[1], response_tokens=[2],
                                               metadata={"response_text": text}), "46,102")

    assert score("46,102") == 1.0 and score(" 46,102 ") == 1.0
    assert score("46,103") == pytest.approx(5 / 6)
    assert score("46,1023") == pytest.approx(6 / 7)  # an extra character costs a position
    assert score("46") == pytest.approx(2 / 6) and score("") == 0.0
    assert score("6,102") == pytest.approx(0 / 6)  # a dropped character shifts everything after it
    with pytest.raises(ValueError, match="response_text"):
        get_reward("scratchpad")(Sample(prompt_tokens=[1], response_tokens=[2]), "1")
