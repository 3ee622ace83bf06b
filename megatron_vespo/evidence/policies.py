"""Policies for the mechanism study: a tabular product policy (exact gradient) and a small Qwen3-MoE.

Both answer the same three questions for P prompts with fixed-length responses of T tokens:

* ``sample(group_size, gen)`` -> ``(rows [B], tokens [B, T])``: B = P * group_size responses drawn
  at temperature 1, ``rows`` the prompt index of each;
* ``log_probs(rows, tokens)`` -> [B, T] log pi(y_t | prompt, y_<t), differentiable;
* ``exact_gradient(labels)``: the exact on-policy gradient of the expected ``token_class`` reward,
  or None where it has no closed form.

``TabularPolicy`` has one logit table per (prompt, position): pi(y | x) = prod_t softmax(theta[x, t])[y_t].
Its sequence weight W = pi / mu is a product of T independent token ratios, exactly the object whose
variance the paper's Prop. 3.1 is about, and the gradient of J = E[mean_t 1(y_t = c mod 4)] is exact,
so the study's target has no sampling noise. ``MoEPolicy`` is the real architecture (HF transformers
Qwen3-MoE of a preset); its target must be estimated from fresh samples.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_vespo.rewards import NUM_CLASSES


class TabularPolicy(torch.nn.Module):
    """pi(y | x) = prod_t softmax(theta[x, t])[y_t], theta [P, T, V] (initialised N(0, init_std^2))."""

    def __init__(self, num_prompts: int, response_len: int, vocab_size: int, seed: int, init_std: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(
            init_std * torch.randn(num_prompts, response_len, vocab_size, generator=g, dtype=torch.float64))

    @property
    def vocab_size(self) -> int:
        """V."""
        return self.theta.shape[-1]

    @torch.no_grad()
    def sample(self, group_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``group_size`` responses per prompt; returns (rows [B], tokens [B, T])."""
        P, T, V = self.theta.shape
        probs = torch.softmax(self.theta, dim=-1).repeat_interleave(group_size, dim=0)  # [B, T, V]
        tokens = torch.multinomial(probs.reshape(-1, V), 1, generator=gen).reshape(P * group_size, T)
        return torch.arange(P).repeat_interleave(group_size), tokens

    def log_probs(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] log pi of ``tokens`` for prompts ``rows``."""
        return torch.log_softmax(self.theta[rows], dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def exact_gradient(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """d/dtheta of J = mean_x mean_t P(y_t = c_x mod 4), flattened (float64)."""
        P, T, V = self.theta.shape
        in_class = (torch.arange(V).unsqueeze(0) % NUM_CLASSES) == (labels % NUM_CLASSES).unsqueeze(1)  # [P, V]
        theta = self.theta.detach().clone().requires_grad_(True)
        j = (torch.softmax(theta, dim=-1) * in_class.unsqueeze(1)).sum(-1).mean()
        (g,) = torch.autograd.grad(j, theta)
        return g.reshape(-1)


class MoEPolicy(torch.nn.Module):
    """A randomly initialised HF Qwen3-MoE of a preset, with P fixed random prompts of ``prompt_len`` ids."""

    def __init__(self, preset: str, num_prompts: int, prompt_len: int, response_len: int, seed: int):
        super().__init__()
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        from megatron_vespo.models.presets import PRESETS

        torch.manual_seed(seed)
        self.model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**PRESETS[preset])).float()
        self.model.eval()  # no dropout; gradients still flow
        g = torch.Generator().manual_seed(10_000 + seed)
        self.register_buffer("prompts", torch.randint(3, self.vocab_size, (num_prompts, prompt_len), generator=g))
        self.response_len = response_len

    @property
    def vocab_size(self) -> int:
        """V."""
        return self.model.config.vocab_size

    @torch.no_grad()
    def sample(self, group_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``group_size`` responses per prompt, position by position (no KV cache: exact, seeded by ``gen``)."""
        rows = torch.arange(self.prompts.shape[0]).repeat_interleave(group_size)
        tokens = self.prompts[rows]
        for _ in range(self.response_len):
            logits = self.model(input_ids=tokens).logits[:, -1].float()
            tokens = torch.cat([tokens, torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)], dim=1)
        return rows, tokens[:, self.prompts.shape[1]:]

    def log_probs(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] log pi of ``tokens`` after prompts ``rows`` (teacher forcing)."""
        lp = self.prompts.shape[1]
        full = torch.cat([self.prompts[rows], tokens], dim=1)
        logits = self.model(input_ids=full).logits[:, lp - 1:-1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()

    def exact_gradient(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """No closed form for an autoregressive network: None (the study estimates it)."""
        return None


def token_class_rewards(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] fraction of response tokens congruent to the row's label mod 4 (``rewards.token_class``, vectorised)."""
    return ((tokens % NUM_CLASSES) == (labels % NUM_CLASSES).unsqueeze(1)).double().mean(dim=1)
