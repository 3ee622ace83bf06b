"""Mechanism study: how well each loss's gradient on stale samples tracks the on-policy gradient.

The paper's Prop. 3.1 argument, measured directly and cheaply. A policy (``policies``: a tabular
product policy with an exact gradient, or a small Qwen3-MoE) is trained on-policy for K updates,
keeping every snapshot theta_0 .. theta_K. The *current* policy is theta_K;
the *behaviour* policy for staleness k is theta_{K-k}. For every k and every loss L:

* g_stale(L, k): the gradient at theta_K of L on B responses sampled from theta_{K-k}, with
  ``old_log_prob`` = log theta_{K-k} (so W = pi / mu carries k updates of drift); redrawn
  ``resamples`` times;
* g_on: the on-policy target at theta_K: minus the exact gradient of the expected reward (tabular),
  or, where there is no closed form (MoE), the same loss's gradient averaged over
  ``reference_batches`` fresh batches from theta_K (W = 1).

Reported per (k, loss): cosine of single-batch gradients with g_on (mean, std over resamples); the
cosine and relative error of the resample-mean gradient (its bias: losses differ in scale, so the
cosine is the comparable figure against an exact target); the resample variance
``E||g - mean g||^2 / ||mean g||^2``; and the distribution of the sequence weights W (ESS / B,
quantiles of log W). Row k = 0 is the floor: stale and fresh samples come from the same policy.

This runs the registry's loss code (``losses.compute_policy_loss``) outside the Megatron actor: it
studies the estimator, not the training stack, so one process and plain autograd suffice. Task: the
synthetic token-class reward (``rewards.token_class``: fraction of response tokens congruent to the
prompt's label mod 4) with fixed-length responses.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from megatron_vespo.buffer.advantages import group_advantages
from megatron_vespo.evidence.policies import MoEPolicy, TabularPolicy, token_class_rewards
from megatron_vespo.losses import compute_policy_loss
from megatron_vespo.losses.psis import psis_smooth
from megatron_vespo.rewards import NUM_CLASSES

logger = logging.getLogger(__name__)

# Each loss at its published default (issue 10's list): GRPO 0.2/0.28 (DAPO clip-higher), GSPO 3e-4/4e-4,
# SAPO 1.0/1.05, VESPO (2, 3) / (3, 2); the others at the registry defaults.
DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "vespo": {"c1_pos": 2.0, "c2_pos": 3.0, "c1_neg": 3.0, "c2_neg": 2.0},
    "grpo": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28},
    "gspo": {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "cispo": {}, "snis": {}, "gepo": {}, "gmpo": {}, "psis": {},
    "vespo_adaptive": {"c1_pos": 2.0, "c2_pos": 3.0, "c1_neg": 3.0, "c2_neg": 2.0, "target_ess": 0.5},
}
_VESPO = DEFAULT_PARAMS["vespo"]
# The paper's ablations (its Sec. 4 / Fig. 7), as "loss@variant" labels usable wherever a loss name is.
VARIANTS: dict[str, dict[str, float]] = {
    "vespo@len_T": {**_VESPO, "length_norm_power": 1.0},
    "vespo@len_sqrtT": {**_VESPO, "length_norm_power": 0.5},
    "vespo@sym23": {"c1_pos": 2.0, "c2_pos": 3.0, "c1_neg": 2.0, "c2_neg": 3.0},
    "vespo@sym32": {"c1_pos": 3.0, "c2_pos": 2.0, "c1_neg": 3.0, "c2_neg": 2.0},
}


@dataclass
class MechanismConfig:
    """What to measure. B = num_prompts * group_size responses per batch, each ``response_len`` tokens."""

    policy: Literal["tabular", "moe"] = "tabular"
    preset: str = "tiny"  # moe only
    vocab_size: int = 16  # tabular only
    response_len: int = 32
    prompt_len: int = 8  # moe only
    num_prompts: int = 16
    group_size: int = 8
    trajectory_updates: int = 64
    lr: float = 3e-2
    staleness: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
    resamples: int = 16
    reference_batches: int = 16  # moe only (the tabular target is exact)
    losses: tuple[str, ...] = ("vespo", "grpo", "gspo", "sapo", "cispo", "snis", "gepo")
    loss_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if max(self.staleness) > self.trajectory_updates:
            raise ValueError(f"staleness up to {max(self.staleness)} needs trajectory_updates >= that, "
                             f"got {self.trajectory_updates}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are group-relative)")
        if self.policy not in ("tabular", "moe"):
            raise ValueError(f"policy must be 'tabular' or 'moe', got {self.policy!r}")

    def params(self, loss: str) -> dict[str, Any]:
        """Loss parameters of a label: an explicit ``loss_params`` entry, else the variant's or published default."""
        if loss in self.loss_params:
            return dict(self.loss_params[loss])
        return dict(VARIANTS.get(loss, DEFAULT_PARAMS.get(loss, {})))

    def build_policy(self) -> torch.nn.Module:
        """A fresh policy of the configured kind (same seed: same initial weights)."""
        if self.policy == "tabular":
            return TabularPolicy(self.num_prompts, self.response_len, self.vocab_size, self.seed)
        return MoEPolicy(self.preset, self.num_prompts, self.prompt_len, self.response_len, self.seed)


class Task:
    """Labels per prompt; draws batches from a policy and scores them with the token-class reward."""

    def __init__(self, cfg: MechanismConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(15_000 + cfg.seed)
        self.labels = torch.randint(0, NUM_CLASSES, (cfg.num_prompts,), generator=g)

    def draw(self, policy: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Sample one batch from ``policy``: rows, tokens, behaviour log-probs, rewards, advantages, mask."""
        rows, tokens = policy.sample(self.cfg.group_size, gen)
        with torch.no_grad():
            old = policy.log_probs(rows, tokens)
        rewards = token_class_rewards(tokens, self.labels[rows])
        adv = group_advantages(rewards, rows).double()
        return {"rows": rows, "tokens": tokens, "old": old, "rewards": rewards, "adv": adv,
                "mask": torch.ones_like(old, dtype=torch.bool)}


def flat_grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The gradient of ``loss`` w.r.t. ``params`` as one float64 vector (zeros for unused params)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def loss_grads(policy: torch.nn.Module, batch: dict[str, torch.Tensor],
               cfg: MechanismConfig) -> dict[str, torch.Tensor]:
    """Gradient vector of every configured loss at ``policy`` on ``batch`` (one forward, one backward each)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    logp = policy.log_probs(batch["rows"], batch["tokens"])
    out = {}
    for name in cfg.losses:
        loss, _ = compute_policy_loss(name.split("@")[0], log_prob=logp, old_log_prob=batch["old"].to(logp.dtype),
                                      advantages=batch["adv"].to(logp.dtype), response_mask=batch["mask"],
                                      group_index=batch["rows"], **cfg.params(name))
        out[name] = flat_grads(loss, params)
    batch["log_w"] = (logp.detach() - batch["old"]).sum(dim=1).double()
    return out


def train_trajectory(cfg: MechanismConfig) -> tuple[list[dict[str, torch.Tensor]], Task, list[float]]:
    """K on-policy GRPO updates (Adam); returns the K + 1 snapshots, the task, and the reward per update."""
    policy = cfg.build_policy()
    task = Task(cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    snaps = [copy.deepcopy(policy.state_dict())]
    rewards = []
    for step in range(cfg.trajectory_updates):
        b = task.draw(policy, gen)
        logp = policy.log_probs(b["rows"], b["tokens"])
        loss, _ = compute_policy_loss("grpo", log_prob=logp, old_log_prob=b["old"].to(logp.dtype),
                                      advantages=b["adv"].to(logp.dtype), response_mask=b["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        snaps.append(copy.deepcopy(policy.state_dict()))
        rewards.append(float(b["rewards"].mean()))
        if (step + 1) % 16 == 0:
            logger.info("trajectory update %d/%d: reward %.3f", step + 1, cfg.trajectory_updates, rewards[-1])
    return snaps, task, rewards


def _ess_frac(log_w: torch.Tensor) -> float:
    w = torch.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (w.square().sum() * log_w.numel()))


def _targets(cfg: MechanismConfig, current: torch.nn.Module, task: Task,
             gen: torch.Generator) -> dict[str, torch.Tensor]:
    exact = current.exact_gradient(task.labels)
    if exact is not None:  # a loss is minimised: its on-policy gradient points along -grad J
        return {name: -exact for name in cfg.losses}
    total: dict[str, torch.Tensor] = {}
    for _ in range(cfg.reference_batches):
        for name, v in loss_grads(current, task.draw(current, gen), cfg).items():
            total[name] = total.get(name, 0) + v
    return {name: v / cfg.reference_batches for name, v in total.items()}


def run_mechanism(cfg: MechanismConfig) -> dict[str, Any]:
    """Run the study; returns ``{"config": ..., "trajectory_reward": [...], "rows": [...]}``.

    One row per (k, loss): ``cos_mean``, ``cos_std`` (single batches), ``cos_of_mean`` and ``bias_rel``
    (the resample-mean gradient against the target), ``rel_var`` (resample variance / squared norm of the
    mean), ``ess_frac`` (ESS / B of W, mean over resamples), ``khat_mean`` / ``khat_gt_0_7`` (PSIS's Pareto
    k-hat of each batch's W: mean, and the fraction of batches above 0.7), ``log_w_p05/p50/p95/max``.
    """
    snapshots, task, traj_reward = train_trajectory(cfg)
    K = len(snapshots) - 1
    current, behaviour = cfg.build_policy(), cfg.build_policy()
    current.load_state_dict(snapshots[K])
    gen = torch.Generator().manual_seed(30_000 + cfg.seed)
    g_on = _targets(cfg, current, task, gen)
    rows = []
    for k in cfg.staleness:
        behaviour.load_state_dict(snapshots[K - k])
        per_loss: dict[str, list[torch.Tensor]] = {name: [] for name in cfg.losses}
        log_ws = []
        for _ in range(cfg.resamples):
            batch = task.draw(behaviour, gen)
            for name, v in loss_grads(current, batch, cfg).items():
                per_loss[name].append(v)
            log_ws.append(batch["log_w"])
        lw = torch.cat(log_ws)
        q = torch.quantile(lw, torch.tensor([0.05, 0.5, 0.95], dtype=lw.dtype)).tolist()
        ess = sum(_ess_frac(x) for x in log_ws) / len(log_ws)
        khats = [psis_smooth(x, torch.ones_like(x, dtype=torch.bool))[1] for x in log_ws]  # per batch
        finite = [x for x in khats if math.isfinite(x)]  # W = 1 exactly (k = 0) has no tail to fit
        khat = sum(finite) / len(finite) if finite else float("nan")
        for name, gs in per_loss.items():
            G, ref = torch.stack(gs), g_on[name]
            ref_norm = ref.norm().clamp(min=1e-300)
            cos = torch.nn.functional.cosine_similarity(G, ref.unsqueeze(0), dim=1)
            mean_g = G.mean(0)
            rel_var = float((G - mean_g).square().sum(1).mean() / mean_g.square().sum().clamp(min=1e-300))
            rows.append({"k": k, "loss": name, "cos_mean": float(cos.mean()), "cos_std": float(cos.std()),
                         "cos_of_mean": float(torch.nn.functional.cosine_similarity(mean_g, ref, dim=0)),
                         "bias_rel": float((mean_g - ref).norm() / ref_norm), "rel_var": rel_var,
                         "ess_frac": ess, "khat_mean": khat,
                         "khat_gt_0_7": sum(x > 0.7 for x in finite) / max(len(finite), 1),
                         "log_w_p05": q[0], "log_w_p50": q[1], "log_w_p95": q[2],
                         "log_w_max": float(lw.max())})
        logger.info("k=%d: ESS/B %.3f, log W p50 %.2f p95 %.2f", k, ess, q[1], q[2])
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
            "trajectory_reward": traj_reward, "rows": rows}
