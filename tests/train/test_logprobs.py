"""Per-token log-probs and entropy: alignment, temperature, gradients, vocab-parallel parity."""

import pytest
import torch
from _dist import run_distributed

from megatron_vespo.train.logprobs import token_log_probs, vocab_parallel_log_probs


def _reference(logits, targets, temperature=1.0):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_single_rank_matches_log_softmax_and_entropy_with_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    targets = torch.randint(0, 11, (3, 5), generator=g)
    for temp in (1.0, 0.7):
        lp, ent = vocab_parallel_log_probs(logits, targets, temperature=temp)
        ref_lp, ref_ent = _reference(logits, targets, temp)
        assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(ent.double(), ref_ent, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_log_probs(logits, targets, temperature=0.0)


def test_gradients_match_autograd_reference():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 9, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, 9, (2, 4), generator=g)
    w1, w2 = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    lp, ent = vocab_parallel_log_probs(logits, targets)
    (lp * w1 + ent * w2).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref_lp, ref_ent = _reference(logits, targets)
    (ref_lp * w1 + ref_ent * w2).sum().backward()
    assert torch.allclose(ours, logits.grad.float(), atol=1e-5)


def test_token_alignment_position_s_scores_token_s():
    vocab, s = 7, 5
    tokens = torch.tensor([[1, 2, 3, 4, 0]])
    logits = torch.full((1, s, vocab), -10.0)
    for pos in range(s - 1):  # position pos predicts token pos + 1 with certainty
        logits[0, pos, tokens[0, pos + 1]] = 10.0
    lp, ent = token_log_probs(logits, tokens)
    assert lp.shape == (1, s) and lp[0, 0] == 0 and ent[0, 0] == 0
    assert bool((lp[0, 1:] > -1e-6).all())
    lp_wrong, _ = token_log_probs(logits, torch.tensor([[1, 3, 3, 4, 0]]))
    assert lp_wrong[0, 1] < -15 and lp_wrong[0, 2] > -1e-6


def _tp_worker(rank, world_size, logits, targets, w1, w2):
    shard = logits.shape[-1] // world_size
    local = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    lp, ent = vocab_parallel_log_probs(local, targets, tp_group=torch.distributed.group.WORLD, temperature=0.9)
    (lp * w1 + ent * w2).sum().backward()
    return lp.detach(), ent.detach(), local.grad


def test_vocab_parallel_over_two_ranks_matches_full_vocab_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 16, generator=g) * 3
    targets = torch.randint(0, 16, (2, 6), generator=g)
    w1, w2 = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    full = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_log_probs(full, targets, temperature=0.9)
    (lp * w1 + ent * w2).sum().backward()
    out = run_distributed(_tp_worker, 2, logits, targets, w1, w2, timeout=120)
    for r_lp, r_ent, _ in out:
        assert torch.allclose(r_lp, lp.detach(), atol=1e-6) and torch.allclose(r_ent, ent.detach(), atol=1e-6)
    assert torch.allclose(torch.cat([o[2] for o in out], dim=-1), full.grad, atol=1e-6)
