"""MegatronActor behaviour on one process: loss bookkeeping, staleness, learning, routing replay, errors."""

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tests (GPU variants in test_gpu.py)"),
              pytest.mark.usefixtures("parallel_teardown_module")]

from actor_cases import make_actor, make_batch  # noqa: E402

from megatron_vespo.config.base import ConfigError  # noqa: E402
from megatron_vespo.losses import compute_policy_loss  # noqa: E402


@pytest.mark.parametrize("loss", [{"name": "vespo"}, {"name": "grpo", "loss_agg_mode": "seq-mean-token-sum"},
                                  {"name": "gmpo"}])
def test_global_loss_equals_registry_loss_on_the_whole_mini_batch(loss):
    """Micro-batch losses (global denominator, x n_micro x DP) sum to the registry loss of the mini-batch."""
    actor = make_actor({}, loss=loss, train={"micro_batch_size": 1})
    batch = make_batch(actor)
    lp, _ = actor.compute_log_probs(batch)  # = the weights update 1 runs with, and its old log-probs
    metrics = actor.train_on_rollout(batch)
    rows = torch.arange(4)
    ref, _ = compute_policy_loss(loss["name"], log_prob=lp[rows], old_log_prob=lp[rows] * batch.loss_mask[rows],
                                 advantages=batch.advantages[rows], response_mask=batch.loss_mask[rows],
                                 loss_agg_mode=loss.get("loss_agg_mode"), group_index=batch.group_index[rows])
    assert metrics[0]["loss"] == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    for m in metrics:  # 4 micro-batches of one row each
        assert m["loss/micro_batch_sum"] == pytest.approx(m["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss", [{"name": "grpo", "loss_agg_mode": "seq-mean-token-sum-norm"},
                                  {"name": "vespo", "rollout_is": {"enabled": True, "threshold": 1.2}}])
def test_micro_batches_carry_is_weights_and_the_fixed_length_norm(loss):
    """Rollout-IS weights reach every micro-batch (MicroBatch.is_weights) and seq-mean-token-sum-norm
    divides every micro-batch by the mini-batch's longest response: the micro-batch losses sum to
    the registry loss of the whole mini-batch."""
    from megatron_vespo.losses import compute_rollout_is_weights

    actor = make_actor({}, loss=loss, train={"micro_batch_size": 1})
    batch = make_batch(actor)
    lp, _ = actor.compute_log_probs(batch)
    old, mask, weights, rows = lp * batch.loss_mask, batch.loss_mask.float(), None, torch.arange(4)
    if "rollout_is" in loss:
        res = compute_rollout_is_weights(old, batch.rollout_log_probs.float(), mask, actor.loss_cfg.rollout_is)
        weights, mask = res.weights[rows], mask * res.mask
        assert not torch.allclose(weights[mask[rows] > 0], torch.ones(())), "the case must exercise the weights"
    norm = loss.get("loss_agg_mode") == "seq-mean-token-sum-norm"
    metrics = actor.train_on_rollout(batch)
    ref, _ = compute_policy_loss(loss["name"], log_prob=lp[rows], old_log_prob=old[rows],
                                 advantages=batch.advantages[rows], response_mask=mask[rows],
                                 loss_agg_mode=loss.get("loss_agg_mode"), rollout_is_weights=weights,
                                 global_denominator=float(mask[rows].sum(-1).max()) if norm else None)
    assert metrics[0]["loss"] == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    assert metrics[0]["loss/micro_batch_sum"] == pytest.approx(metrics[0]["loss"], rel=1e-5, abs=1e-6)


def test_micro_batch_size_does_not_change_the_update():
    runs = []
    for micro in (1, 4):
        actor = make_actor({}, train={"micro_batch_size": micro})
        batch = make_batch(actor)
        runs.append([(m["loss"], m["grad_norm"]) for _ in range(2) for m in actor.train_on_rollout(batch)])
    for (l1, g1), (l4, g4) in zip(*runs):
        assert l1 == pytest.approx(l4, rel=1e-5, abs=1e-6) and g1 == pytest.approx(g4, rel=1e-5)


@pytest.mark.parametrize("loss", [{"name": "vespo"}, {"name": "gepo"}])
def test_one_micro_batch_reports_the_same_metrics_as_a_split_mini_batch(loss, monkeypatch):
    """With one micro-batch the report reuses the step's own loss metrics instead of recomputing them;
    every reported number must still be the whole mini-batch's, as with 4 micro-batches (recomputed)."""
    from megatron_vespo.train import metrics as train_metrics

    reports, recomputed = {}, []
    real = train_metrics.compute_policy_loss
    monkeypatch.setattr(train_metrics, "compute_policy_loss", lambda *a, **k: (recomputed.append(1), real(*a, **k))[1])
    for micro in (4, 1):
        actor = make_actor({}, loss=loss, train={"micro_batch_size": micro})
        recomputed.clear()
        reports[micro] = actor.train_on_rollout(make_batch(actor))[0]
        assert (len(recomputed) > 0) == (micro == 1), micro  # recomputed only when split
    one, split = reports[4], reports[1]
    skip = {k for k in one if k.startswith("time/")} | {"tokens_per_s"}
    assert set(one) == set(split) and any(k.startswith("loss/") for k in one)
    for k in sorted(set(one) - skip):
        assert one[k] == pytest.approx(split[k], rel=1e-5, abs=1e-6), k


def test_staleness_update_k_uses_old_log_probs_from_before_update_one():
    actor = make_actor({}, train={"mini_batch_size": 2, "micro_batch_size": 2, "lr": 5e-3})
    batch = make_batch(actor)
    metrics = actor.train_on_rollout(batch)
    assert len(metrics) == 4  # N = 8 / 2
    assert metrics[0]["is/seq_log_w_absmax"] == 0.0 and metrics[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-7)
    assert metrics[0]["kl_old"] == pytest.approx(0.0, abs=1e-7)
    # later updates score their mini-batch against the pre-update-1 policy: weights drift from 1
    assert all(m["is/seq_log_w_absmax"] > 1e-4 for m in metrics[1:])
    assert metrics[3]["kl_old"] > metrics[1]["kl_old"] > 0
    assert [m["update"] for m in metrics] == [0.0, 1.0, 2.0, 3.0]
    # with old_log_prob_source=rollout the engine's log-probs are the behaviour policy from the start
    actor = make_actor({}, train={"old_log_prob_source": "rollout"})
    metrics = actor.train_on_rollout(make_batch(actor))
    assert metrics[0]["is/seq_log_w_absmax"] > 1.0


def test_policy_learns_towards_positive_advantages():
    actor = make_actor({}, train={"mini_batch_size": 4, "micro_batch_size": 4, "lr": 1e-3})
    batch = make_batch(actor)
    mask, pos = batch.loss_mask > 0, batch.advantages > 0
    lp0, _ = actor.compute_log_probs(batch)
    for _ in range(100):  # 200 optimizer updates
        metrics = actor.train_on_rollout(batch)
    lp1, _ = actor.compute_log_probs(batch)
    up = (lp1 - lp0)[pos.unsqueeze(1) & mask].mean().item()
    down = (lp1 - lp0)[~pos.unsqueeze(1) & mask].mean().item()
    assert up > 2.0 and down < -2.0, (up, down)
    assert metrics[-1]["lr"] == pytest.approx(1e-3) and metrics[-1]["tokens_per_s"] > 0


def _routing_maps(actor):
    maps = {}
    hooks = [router.register_forward_hook(lambda m, a, out, layer=layer: maps.setdefault(layer, []).append(out[1]))
             for layer, router in actor.routing.routers]
    return maps, hooks


def test_r3_forces_every_moe_layer_onto_the_given_routes_and_the_router_still_learns():
    from megatron_vespo.routing.routes import fill_unrouted

    actor = make_actor({}, routing="R3", train={"micro_batch_size": 4})
    batch = make_batch(actor)
    maps, hooks = _routing_maps(actor)
    actor.compute_log_probs(batch)
    for h in hooks:
        h.remove()
    routes = fill_unrouted(batch.routed_experts, batch.attention_lengths, num_experts=8)  # the actor's filler
    assert sorted(maps) == [0, 1]
    for layer, per_mb in maps.items():
        want = torch.zeros(8, 16, 8, dtype=torch.bool).scatter_(2, routes[:, :, layer], True)
        assert len(per_mb) == 2  # one micro-batch of 4 rows per mini-batch
        for k, m in enumerate(per_mb):  # sequence-major rows -> [b, S_k, E]; mini-batches are trimmed
            got = m.view(-1, 4, 8).transpose(0, 1)
            assert torch.equal(got, want[4 * k:4 * k + 4, :got.shape[1]]), f"MoE layer {layer} ignored the routes"
    before = [r.weight.detach().clone() for _, r in actor.routing.routers]
    metrics = actor.train_on_rollout(batch)
    for (_, router), w0 in zip(actor.routing.routers, before):
        assert router.weight.main_grad.abs().sum() > 0 and not torch.equal(router.weight.detach(), w0)
    assert metrics[0]["routing/replayed_forwards"] == 2  # 2 MoE layers x 1 micro-batch of 4 rows


def test_r2_replay_reproduces_the_recorded_forward_exactly():
    actor = make_actor({}, routing="R2", train={"lr": 2e-2})
    batch = make_batch(actor)
    lp_rec, _, routes = actor._log_prob_pass(batch, with_entropy=False, routes=None, record=True)
    assert routes.shape == (8, 16, 2, 2)
    for k in range(2):  # every position of each (trimmed) mini-batch was recorded
        s_k = int(batch.attention_lengths[4 * k:4 * k + 4].max())
        assert bool((routes[4 * k:4 * k + 4, :s_k] >= 0).all())
    lp_rep, _ = actor.compute_log_probs(batch, routes=routes)
    assert torch.equal(lp_rec, lp_rep)
    for _ in range(3):  # move the weights; the recorded routes stay replayable and are used
        actor.train_on_rollout(batch)
    maps, hooks = _routing_maps(actor)
    actor.compute_log_probs(batch, routes=routes)
    for h in hooks:
        h.remove()
    for layer, per_mb in maps.items():
        want = torch.zeros(8, 16, 8, dtype=torch.bool).scatter_(2, routes[:, :, layer].clamp(min=0), True)
        for k, m in enumerate(per_mb):  # micro-batches of 2 rows, in row order
            got = m.view(-1, 2, 8).transpose(0, 1)
            assert torch.equal(got, want[2 * k:2 * k + 2, :got.shape[1]])


def test_r2_with_rollout_log_probs_still_records_and_replays():
    actor = make_actor({}, routing="R2", train={"old_log_prob_source": "rollout"})
    metrics = actor.train_on_rollout(make_batch(actor))
    assert [m["routing/replayed_forwards"] for m in metrics] == [4.0, 4.0]  # 2 layers x 2 micro-batches
    assert metrics[0]["is/seq_log_w_absmax"] > 1.0  # behaviour policy = the engine's log-probs


def test_replay_controller_refuses_unconsumed_or_misshaped_routes():
    actor = make_actor({}, routing="R3")
    batch = make_batch(actor)
    rp = actor.routing
    rp.start_replay()
    rp.push_micro_batch(torch.arange(2), routes=torch.zeros(2, 16, 2, 2, dtype=torch.long) + torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="never used"):
        rp.finish()
    bad = make_batch(actor)
    bad.routed_experts = bad.routed_experts[:, :, :1]
    with pytest.raises(ValueError, match=r"TrainBatch.routed_experts has shape \(8, 16, 1, 2\), expected"):
        actor.train_on_rollout(bad)
    bad = make_batch(actor)
    bad.routed_experts[5, 3, 1] = torch.tensor([7, 7])
    with pytest.raises(ValueError, match="sample 5 position 3"):
        actor.train_on_rollout(bad)
    batch.rollout_log_probs = None
    actor = make_actor({}, train={"old_log_prob_source": "rollout"})
    with pytest.raises(ValueError, match="TrainBatch.rollout_log_probs"):
        actor.train_on_rollout(batch)


def test_recompute_replays_the_same_routes_in_the_backward_rerun():
    over = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    runs = []
    for overrides in ({}, over):
        actor = make_actor({}, routing="R3", overrides=overrides)
        metrics = actor.train_on_rollout(make_batch(actor))
        runs.append(metrics)
    assert runs[0][0]["routing/replayed_recomputes"] == 0 and runs[1][0]["routing/replayed_recomputes"] == 4
    for a, b in zip(*runs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                 rel=1e-5)


def test_lr_schedule_warmup_then_cosine():
    actor = make_actor({}, train={"lr": 1e-3, "min_lr": 1e-4, "lr_warmup_steps": 2, "lr_decay_style": "cosine",
                                  "train_iters": 3})
    batch = make_batch(actor)
    lrs = [m["lr"] for _ in range(3) for m in actor.train_on_rollout(batch)]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] >= 1e-4


def test_bad_layout_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="mini_batch_size"):
        from megatron_vespo.train.batching import check_divisibility

        check_divisibility(4, 1, 3)
