"""Mechanism study: the exact target is right, the study runs and its k = 0 row is the on-policy floor."""

import json

import torch

from megatron_vespo.evidence.mechanism import MechanismConfig, Task, run_mechanism
from megatron_vespo.evidence.policies import TabularPolicy, token_class_rewards


def test_tabular_exact_gradient_matches_reinforce_estimate():
    """grad J from the closed form equals a large-sample REINFORCE estimate E[R grad log pi]."""
    pol = TabularPolicy(num_prompts=2, response_len=3, vocab_size=5, seed=1)
    labels = torch.tensor([1, 2])
    exact = pol.exact_gradient(labels)
    gen = torch.Generator().manual_seed(0)
    rows, toks = pol.sample(20000, gen)
    r = token_class_rewards(toks, labels[rows])
    logp = pol.log_probs(rows, toks).sum(1)
    # E over prompts of E_y[R grad log pi]; baseline-free, so only the sample size limits accuracy
    (mc,) = torch.autograd.grad((r * logp).sum() / (2 * 20000), pol.theta)
    cos = torch.nn.functional.cosine_similarity(exact, mc.reshape(-1), dim=0)
    assert cos > 0.99
    torch.testing.assert_close(mc.reshape(-1), exact, atol=3e-3, rtol=0)


def test_study_runs_and_on_policy_row_is_the_floor():
    cfg = MechanismConfig(trajectory_updates=8, staleness=(0, 8), resamples=4, num_prompts=4, response_len=8,
                          losses=("vespo", "grpo", "cispo", "gspo"), lr=0.3)
    out = run_mechanism(cfg)
    rows = {(r["k"], r["loss"]): r for r in out["rows"]}
    assert len(out["trajectory_reward"]) == 8
    # k = 0: W = 1, so every loss is the same REINFORCE gradient (equal lengths: token-mean = seq-mean)
    base = rows[0, "vespo"]["cos_of_mean"]
    for loss in ("grpo", "cispo", "gspo"):
        assert abs(rows[0, loss]["cos_of_mean"] - base) < 1e-9
    assert base > 0.3  # it points along +grad J (a sign error gives a negative cosine)
    assert rows[0, "vespo"]["ess_frac"] == 1.0 and rows[8, "vespo"]["ess_frac"] < 1.0
    # same seed, same numbers
    again = run_mechanism(cfg)
    assert json.dumps(again["rows"]) == json.dumps(out["rows"])  # NaN (no k-hat at k = 0) compares equal as text


def test_task_rewards_match_registered_reward():
    from megatron_vespo.rewards import get_reward
    from megatron_vespo.types import Sample

    cfg = MechanismConfig(num_prompts=3, response_len=6, staleness=(0,), trajectory_updates=1)
    task = Task(cfg)
    b = task.draw(cfg.build_policy(), torch.Generator().manual_seed(0))
    fn = get_reward("token_class")
    for i in range(len(b["rows"])):
        s = Sample(prompt_tokens=[1], response_tokens=b["tokens"][i].tolist())
        assert abs(fn(s, int(task.labels[b["rows"][i]])) - float(b["rewards"][i])) < 1e-12
