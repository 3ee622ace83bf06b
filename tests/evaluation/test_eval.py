"""Held-out evaluation: pass@k arithmetic, the held-out split, and `megatron-vespo eval` end to end."""

import json
import math

import pytest

from megatron_vespo.config.job import JobConfig
from megatron_vespo.evaluation.core import HELD_OUT_SEED_OFFSET, load_eval_prompts, pass_at_k


@pytest.mark.parametrize("n,c,k", [(4, 0, 4), (4, 1, 4), (8, 3, 1), (8, 3, 4), (10, 10, 3), (5, 2, 5)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 1.0
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 = fraction correct


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="correct"):
        pass_at_k(4, 5, 2)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(4, 1, 5)


def test_synthetic_held_out_split_differs_from_training_prompts():
    from megatron_vespo.data.prompts import synthetic_prompts

    job = JobConfig()
    held = load_eval_prompts(job.eval, job.data, vocab_size=256, tokenize=None)
    train = synthetic_prompts(job.data.num_prompts, 256, min(job.data.max_prompt_len, 8), job.data.seed,
                              num_targets=job.data.num_labels)
    assert len(held) == 64
    assert not {tuple(p.tokens) for p in held} & {tuple(p.tokens) for p in train}
    assert held[0].tokens == synthetic_prompts(1, 256, 8, job.data.seed + HELD_OUT_SEED_OFFSET,
                                               num_targets=job.data.num_labels)[0].tokens


def test_jsonl_eval_set_in_math_format(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"problem": [5, 6, 7], "answer": "3"}\n{"problem": [8, 9], "answer": "1/2"}\n')
    job = JobConfig.model_validate({"eval": {"path": str(path), "num_prompts": 1}})
    prompts = load_eval_prompts(job.eval, job.data, vocab_size=256, tokenize=None)
    assert [(p.tokens, p.label) for p in prompts] == [([5, 6, 7], "3")]


def test_non_synthetic_job_without_eval_path_is_an_error():
    job = JobConfig.model_validate({"data": {"source": "jsonl", "path": "x.jsonl"}})
    with pytest.raises(ValueError, match="eval.path"):
        load_eval_prompts(job.eval, job.data, vocab_size=256, tokenize=None)


def test_eval_cli_scores_a_policy(tmp_path):
    """The CI smoke run: a tiny HF policy, one embedded engine, 8 held-out prompts x 2 samples + greedy."""
    from megatron_vespo.cli import main
    from megatron_vespo.rollout.embedded.models import save_tiny_checkpoint

    policy = save_tiny_checkpoint(tmp_path / "tiny", preset="tiny", seed=0)
    out = tmp_path / "eval.json"
    rc = main(["eval", "examples/configs/tiny_cpu_vespo.yaml", "--policy", str(policy), "--json", str(out),
               "--set", "rollout.num_engines=1", "--set", "eval.num_prompts=8", "--set", "eval.k=2",
               "--set", "rollout.sampling.max_new_tokens=6"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["eval/num_prompts"] == 8.0
    assert 0.0 <= m["eval/avg@2"] <= 1.0 and 0.0 <= m["eval/greedy"] <= 1.0
    assert m["eval/response_len_mean"] <= 6
    # the same seed gives the same figures
    out2 = tmp_path / "eval2.json"
    main(["eval", "examples/configs/tiny_cpu_vespo.yaml", "--policy", str(policy), "--json", str(out2),
          "--set", "rollout.num_engines=1", "--set", "eval.num_prompts=8", "--set", "eval.k=2",
          "--set", "rollout.sampling.max_new_tokens=6"])
    m2 = json.loads(out2.read_text())
    assert {k: v for k, v in m2.items()} == m


def test_eval_cli_without_policy_names_the_flag(tmp_path, caplog):
    from megatron_vespo.cli import main

    assert main(["eval", "examples/configs/tiny_cpu_vespo.yaml"]) == 2
    assert "--policy" in caplog.text
