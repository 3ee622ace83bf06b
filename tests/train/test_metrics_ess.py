"""The loss-independent ESS of sequence weights logged by every update (``is/ess``)."""

import math

import torch

from megatron_vespo.train.metrics import normalized_ess


def test_normalized_ess_matches_kish_and_survives_huge_log_weights():
    w = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    kish = float(w.sum() ** 2 / (len(w) * (w ** 2).sum()))
    assert math.isclose(normalized_ess(w.log()), kish, rel_tol=1e-12)
    assert math.isclose(normalized_ess(torch.zeros(5)), 1.0, rel_tol=1e-12)  # on-policy: every W = 1
    # one sequence dominates: ESS -> 1/n; exp(800) overflows float64, the log-space form does not
    assert math.isclose(normalized_ess(torch.tensor([800.0, 0.0, 0.0, 0.0])), 0.25, rel_tol=1e-9)
    assert normalized_ess(torch.tensor([])) == 1.0
