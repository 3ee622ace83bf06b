"""The embedded engine's decode loop: one batch of requests from prefill to the last token.

A left-padded prefill with position ids from the attention mask, then one token per step with a
``transformers.DynamicCache``; finished rows are dropped from the batch and the cache. Per step:
the pause gate (control calls run between steps), SGLang's log-prob convention
(``sampling.reported_log_probs``), per-request seeded sampling, and the routed experts of every
real token when a request asks for them (``capture.py``). :class:`BatchDecoding` is a mixin of
:class:`~megatron_vespo.rollout.embedded.engine.EmbeddedEngine`, which owns the queue, the worker
thread and the weights.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from megatron_vespo.rollout.embedded.requests import GenRequest
from megatron_vespo.rollout.embedded.sampling import reported_log_probs, sample_tokens
from megatron_vespo.utils.imports import require


def abort_result(message: str) -> dict:
    """SGLang's ``finish_reason`` of an aborted request."""
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


class BatchDecoding:
    """``run_batch`` and its step helpers; the engine supplies the members declared here."""

    model: Any
    capture: Any
    eos_ids: set[int]
    weight_version: str
    original_logprob: bool
    generated_tokens: int
    _rng: random.Random

    def _gate(self, reqs: list[GenRequest]) -> None:
        """Provided by the engine: wait while paused (running control calls meanwhile)."""
        raise NotImplementedError

    @torch.no_grad()
    def run_batch(self, reqs: list[GenRequest]) -> None:
        """Generate every request of ``reqs`` to completion (also callable without the worker)."""
        transformers = require("transformers", "the embedded rollout engine")
        live, gens = [], []
        for r in reqs:
            r.version_spans = [[self.weight_version, 0]]
            if r.aborted:
                r.finish(abort_result(r.aborted))
                continue
            try:  # per request: one bad seed must not fail the requests batched with it
                gens.append(torch.Generator().manual_seed(r.sampling_seed if r.sampling_seed is not None
                                                          else self._rng.getrandbits(63)))
            except (RuntimeError, OverflowError, TypeError, ValueError) as exc:
                r.finish({**abort_result(f"sampling_seed {r.sampling_seed!r} rejected: {exc}"), "status_code": 400})
                continue
            live.append(r)
        if not live:
            return
        lens = [len(r.input_ids) for r in live]
        width = max(lens)
        ids = torch.zeros(len(live), width, dtype=torch.long)
        attn = torch.zeros(len(live), width, dtype=torch.long)
        for b, r in enumerate(live):
            ids[b, width - lens[b]:] = torch.tensor(r.input_ids)
            attn[b, width - lens[b]:] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        capture = self.capture if any(r.return_routed_experts for r in live) else None
        want_input = any(r.return_logprob and r.logprob_start_len < len(r.input_ids) for r in live)
        cache = transformers.DynamicCache(config=self.model.config)
        rows = list(range(len(live)))  # batch row -> index into live
        step = 0
        try:
            while rows:
                self._gate([live[i] for i in rows])
                if any(live[i].aborted for i in rows):
                    for i in rows:
                        if live[i].aborted:
                            live[i].finish(abort_result(live[i].aborted))
                    ids, attn, pos, rows = self._compact(cache, ids, attn, pos, rows, live)
                    continue  # the rest may still be paused: gate again
                if capture is not None:
                    capture.start()
                out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                                 use_cache=True, logits_to_keep=0 if (step == 0 and want_input) else 1)
                if capture is not None:
                    routes = capture.collect(len(rows), ids.shape[1])
                    for b, i in enumerate(rows):
                        if live[i].return_routed_experts:
                            live[i].routes.append(routes[b, width - lens[i]:] if step == 0 else routes[b, -1:])
                if step == 0 and want_input:
                    self._input_logprobs(out.logits, live, lens, width)
                logits = out.logits[:, -1].float()
                params = [live[i].params for i in rows]
                # SGLang clamps to the dtype's min so an underflowed -inf never reaches JSON.
                lps = reported_log_probs(logits, params, self.original_logprob)
                lps.clamp_(min=torch.finfo(torch.float32).min)
                toks = sample_tokens(logits, params, [gens[i] for i in rows])
                chosen = lps.gather(1, toks[:, None]).squeeze(1).tolist()  # one conversion, not per row
                for b, (i, tok) in enumerate(zip(rows, toks.tolist())):
                    self._append(live[i], tok, chosen[b])
                self.generated_tokens += len(rows)
                ids = toks[:, None]
                attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype)], dim=1)
                pos = pos[:, -1:] + 1
                ids, attn, pos, rows = self._compact(cache, ids, attn, pos, rows, live)
                step += 1
        finally:
            if capture is not None:
                capture.stop()

    def _append(self, r: GenRequest, tok: int, lp: float) -> None:
        if r.max_new_tokens == 0:
            r.finish({"type": "length", "length": 0})
            return
        r.output_ids.append(tok)
        r.output_logprobs.append(lp)
        if tok in r.stop_token_ids or (not r.ignore_eos and tok in self.eos_ids):
            r.finish({"type": "stop", "matched": tok})
        elif len(r.output_ids) >= r.max_new_tokens:
            r.finish({"type": "length", "length": r.max_new_tokens})

    @staticmethod
    def _compact(cache: Any, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, rows: list[int],
                 live: list[GenRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        keep = [b for b, i in enumerate(rows) if live[i].finish_reason is None]
        if len(keep) == len(rows):
            return ids, attn, pos, rows
        idx = torch.tensor(keep, dtype=torch.long)
        if keep:
            cache.batch_select_indices(idx)
        return ids[idx], attn[idx], pos[idx], [rows[b] for b in keep]

    @staticmethod
    def _input_logprobs(logits: torch.Tensor, live: list[GenRequest], lens: list[int], width: int) -> None:
        """SGLang prompt log-probs: raw log_softmax, ``None`` for the first returned token."""
        for b, r in enumerate(live):
            if not r.return_logprob or r.logprob_start_len >= lens[b]:
                continue
            lsm = torch.log_softmax(logits[b].float(), dim=-1)
            off = width - lens[b]
            r.input_logprobs = [None] + [float(lsm[off + j - 1, r.input_ids[j]])
                                         for j in range(r.logprob_start_len + 1, lens[b])]
