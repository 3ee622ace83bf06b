"""Next-token sampling and the log-probs it reports, with SGLang's conventions.

What SGLang returns as ``output_token_logprobs`` (sglang 0.5.23 ``srt/layers/sampler.py``
``Sampler.forward``; ``srt/sampling/sampling_params.py``):

* ``temperature < 1e-6`` is greedy: SGLang rewrites it to ``temperature=1, top_k=1`` and returns
  ``log_softmax(logits)``.
* otherwise it returns ``log(softmax(logits / temperature))`` -- the temperature-scaled
  distribution *before* top-k / top-p truncation (the truncated, renormalised probabilities are
  only used to draw the token).
* with the environment variable ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` it returns the raw
  ``log_softmax(logits)`` whatever the temperature.
* prompt log-probs (``input_token_logprobs``) are always raw ``log_softmax(logits)``.

So a trainer reproduces mu by dividing its logits by the rollout temperature. Sampling here uses
one ``torch.Generator`` per request (seeded by ``sampling_seed``), so a request's tokens depend on
its seed and its own logits only, not on the other requests in the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

SAMPLING_EPS = 1e-6  # SGLang's _SAMPLING_EPS


def return_original_logprob_from_env() -> bool:
    """SGLang's ``SGLANG_RETURN_ORIGINAL_LOGPROB`` switch (true/1/yes)."""
    return os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").strip().lower() in ("1", "true", "yes")


@dataclass
class RowParams:
    """Per-request sampling parameters after SGLang's normalisation."""

    temperature: float
    top_p: float
    top_k: int  # -1 = whole vocabulary
    greedy: bool

    @classmethod
    def normalise(cls, temperature: float, top_p: float, top_k: int) -> "RowParams":
        """Apply SGLang's rule: a temperature below 1e-6 means greedy (temperature 1, top_k 1)."""
        if 0 <= temperature < SAMPLING_EPS:
            return cls(temperature=1.0, top_p=top_p, top_k=1, greedy=True)
        return cls(temperature=temperature, top_p=top_p, top_k=top_k, greedy=top_k == 1)


def reported_log_probs(logits: torch.Tensor, rows: Sequence[RowParams], original: bool) -> torch.Tensor:
    """[B, V] log-probs SGLang reports for the next token (see module docstring)."""
    logits = logits.float()
    if original:
        return torch.log_softmax(logits, dim=-1)
    temps = torch.tensor([r.temperature for r in rows], dtype=logits.dtype, device=logits.device)
    return torch.log_softmax(logits / temps[:, None], dim=-1)


def truncated_probs(logits: torch.Tensor, rows: Sequence[RowParams]) -> torch.Tensor:
    """[B, V] sampling distribution: softmax(logits / T) restricted to top-k and top-p, renormalised.

    Both filters act on the probabilities sorted in descending order (joint application, as
    SGLang's torch fallback does): a token stays if its rank is < top_k and the mass of the
    tokens ranked above it is < top_p.
    """
    logits = logits.float()
    temps = torch.tensor([r.temperature for r in rows], dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    vocab = probs.shape[-1]
    top_ks = torch.tensor([vocab if r.top_k < 0 else min(r.top_k, vocab) for r in rows], device=probs.device)
    top_ps = torch.tensor([r.top_p for r in rows], dtype=probs.dtype, device=probs.device)
    if bool((top_ks >= vocab).all()) and bool((top_ps >= 1.0).all()):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_above = sorted_p.cumsum(dim=-1) - sorted_p
    rank = torch.arange(vocab, device=probs.device)[None, :]
    keep = (rank < top_ks[:, None]) & (mass_above < top_ps[:, None])
    keep[:, 0] = True  # the most likely token always survives
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample_tokens(logits: torch.Tensor, rows: Sequence[RowParams],
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """[B] next tokens: argmax for greedy rows, else a draw from ``truncated_probs`` per row.

    The draw is ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. from the row's generator, an exact
    categorical sample (the exponential race) that needs no cumulative sum.
    """
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.greedy]
    if not sampled:
        return tokens
    probs = truncated_probs(logits[sampled], [rows[i] for i in sampled])
    for j, i in enumerate(sampled):
        race = torch.empty(probs.shape[-1], dtype=torch.float32).exponential_(generator=generators[i])
        tokens[i] = (probs[j] / race.to(probs.device)).argmax()
    return tokens
