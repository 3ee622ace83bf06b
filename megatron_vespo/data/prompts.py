"""Prompt data sets: JSONL files or a built-in synthetic task, with a resumable position.

A ``Prompt`` carries token ids (the rollout engine speaks token ids, as slime and SGLang's
``input_ids`` do) plus the label the reward function needs. ``PromptDataset`` yields
batches in a seeded order that is reshuffled each epoch; ``state_dict`` records
(epoch, offset) so a resumed run continues with the next unseen prompt.

Synthetic task: each prompt is random tokens whose first token is the label (one of
``num_targets`` small ids). With the ``token_class`` reward the response should use tokens
congruent to the label modulo 4 (base rate 1/4, so every group carries signal); a tiny random
model learns it within a few dozen rollouts, a real and cheap learning signal on CPU. The
``target_token`` reward asks for the label token itself (much sparser).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megatron_vespo.data.config import DataConfig

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    """One prompt.

    Attributes:
        tokens: [P] prompt token ids.
        label: what the reward function compares against (target id, reference answer, ...).
        index: position in the data set.
        text: the prompt text when it came from a file (else None).
    """

    tokens: list[int]
    label: Any
    index: int
    text: str | None = None


def synthetic_prompts(num: int, vocab_size: int, prompt_len: int, seed: int = 0,
                      num_targets: int = 4) -> list[Prompt]:
    """Make ``num`` synthetic prompts: first token = target id (one of ``num_targets`` ids), rest random."""
    if vocab_size < num_targets + 2:
        raise ValueError(f"vocab_size ({vocab_size}) too small for {num_targets} targets")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        target = 1 + int(torch.randint(num_targets, (1,), generator=gen))
        rest = torch.randint(num_targets + 1, vocab_size, (prompt_len - 1,), generator=gen).tolist()
        out.append(Prompt(tokens=[target, *rest], label=target, index=i))
    return out


def _check_ids(ids: Any, where: str, key: str, vocab_size: int | None) -> list[int]:
    """``ids`` as a list of token ids, or ValueError naming ``where`` (file:line) and the problem."""
    if not isinstance(ids, list) or not ids:
        raise ValueError(f"{where}: '{key}' must be text or a non-empty list of token ids, got {ids!r:.60}")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)]
    if bad:
        raise ValueError(f"{where}: '{key}' holds non-integer token ids, e.g. {bad[0]!r:.30}")
    if vocab_size is not None:
        out = [t for t in ids if not 0 <= t < vocab_size]
        if out:
            raise ValueError(f"{where}: '{key}' holds token ids outside the vocabulary [0, {vocab_size}), "
                             f"e.g. {out[0]}")
    return list(ids)


def load_jsonl_prompts(path: str | Path, prompt_key: str, label_key: str,
                       tokenize: Callable[[str], list[int]] | None, max_prompt_len: int,
                       vocab_size: int | None = None, on_long_prompt: str = "truncate") -> list[Prompt]:
    """Read and check every prompt of a JSONL file at load; errors name ``file:line`` and the key.

    A prompt is text (tokenized with ``tokenize``) or a non-empty list of integer token ids in
    ``[0, vocab_size)``. Prompts longer than ``max_prompt_len`` tokens are cut to it with one
    warning that counts them (``on_long_prompt="truncate"``) or refused (``"error"``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    if on_long_prompt not in ("truncate", "error"):
        raise ValueError(f"data.on_long_prompt must be truncate or error, got {on_long_prompt!r}")
    prompts: list[Prompt] = []
    long_lines: list[int] = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: each line must be a JSON object with '{prompt_key}' and '{label_key}', "
                                 f"got {type(row).__name__} {row!r:.40}")
            if prompt_key not in row:
                raise ValueError(f"{where}: missing key '{prompt_key}' (data.prompt_key); "
                                 f"keys present: {sorted(row)}")
            if label_key not in row:
                # every reward compares against the label: a missing one would score 0 (or crash) mid-run
                raise ValueError(f"{where}: missing key '{label_key}' (data.label_key); "
                                 f"keys present: {sorted(row)}")
            text = row[prompt_key]
            if isinstance(text, str):
                if tokenize is None:
                    raise ValueError(f"{where}: '{prompt_key}' is text but there is no tokenizer "
                                     "(model.hf_path without tokenizer files): give token ids (a list) or a model "
                                     "with a tokenizer")
                if not text.strip():
                    raise ValueError(f"{where}: '{prompt_key}' is empty text")
                tokens = _check_ids(list(tokenize(text)), where, f"{prompt_key} (tokenized)", vocab_size)
            else:
                tokens = _check_ids(text, where, prompt_key, vocab_size)
            if len(tokens) > max_prompt_len:
                long_lines.append(lineno)
                tokens = tokens[:max_prompt_len]
            prompts.append(Prompt(tokens=tokens, label=row[label_key], index=len(prompts),
                                  text=text if isinstance(text, str) else None))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    if long_lines:
        msg = (f"{path}: {len(long_lines)} of {len(prompts)} prompts are longer than data.max_prompt_len="
               f"{max_prompt_len} tokens (lines {', '.join(map(str, long_lines[:5]))}"
               f"{', ...' if len(long_lines) > 5 else ''})")
        if on_long_prompt == "error":
            raise ValueError(f"{msg}; raise data.max_prompt_len or set data.on_long_prompt=truncate")
        logger.warning("%s: cut to their first %d tokens (data.on_long_prompt=error refuses them)", msg,
                       max_prompt_len)
    return prompts


def check_context_length(cfg: DataConfig, max_new_tokens: int, max_position_embeddings: int,
                         model_source: str = "the model") -> None:
    """Refuse ``data.max_prompt_len + rollout.sampling.max_new_tokens`` beyond the model's context.

    Checked before the engines start: otherwise every request of the first rollout is refused
    by the engine (SGLang and the embedded engine answer 400 when prompt + ``max_new_tokens``
    exceeds the context length). Synthetic prompts are at most 8 tokens long.
    """
    prompt_len = min(cfg.max_prompt_len, 8) if cfg.source == "synthetic" else cfg.max_prompt_len
    if prompt_len + max_new_tokens > max_position_embeddings:
        from megatron_vespo.config.base import ConfigError

        raise ConfigError(f"prompt ({'synthetic: ' if cfg.source == 'synthetic' else ''}data.max_prompt_len "
                          f"{prompt_len}) + rollout.sampling.max_new_tokens {max_new_tokens} = "
                          f"{prompt_len + max_new_tokens} tokens exceeds max_position_embeddings "
                          f"{max_position_embeddings} of {model_source}: lower rollout.sampling.max_new_tokens "
                          "or data.max_prompt_len")


class PromptDataset:
    """Seeded, epoch-shuffled batches of prompts with a resumable position."""

    def __init__(self, prompts: list[Prompt], seed: int = 0) -> None:
        if not prompts:
            raise ValueError("PromptDataset needs at least one prompt")
        self.prompts = prompts
        self.seed = seed
        self.epoch = 0
        self.offset = 0

    @classmethod
    def from_config(cls, cfg: DataConfig, vocab_size: int,
                    tokenize: Callable[[str], list[int]] | None = None) -> "PromptDataset":
        """Build from a ``DataConfig`` (synthetic needs only the vocab size; text JSONL prompts a tokenizer)."""
        if cfg.source == "synthetic":
            prompts = synthetic_prompts(cfg.num_prompts, vocab_size, min(cfg.max_prompt_len, 8), cfg.seed,
                                        num_targets=cfg.num_labels)
        else:
            if cfg.path is None:
                raise ValueError("data.path must be set when data.source=jsonl")
            prompts = load_jsonl_prompts(cfg.path, cfg.prompt_key, cfg.label_key, tokenize, cfg.max_prompt_len,
                                         vocab_size=vocab_size, on_long_prompt=cfg.on_long_prompt)
        return cls(prompts, cfg.seed)

    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=gen).tolist()

    def next_batch(self, n: int) -> list[Prompt]:
        """Return the next ``n`` prompts, crossing epoch boundaries as needed."""
        out: list[Prompt] = []
        while len(out) < n:
            order = self._order(self.epoch)
            take = order[self.offset : self.offset + n - len(out)]
            out.extend(self.prompts[i] for i in take)
            self.offset += len(take)
            if self.offset >= len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[Prompt]:
        while True:
            yield from self.next_batch(1)

    def state_dict(self) -> dict[str, int]:
        """Position for checkpoints."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by ``state_dict``; the data set must be the same size."""
        if state.get("size") != len(self.prompts):
            raise ValueError(f"data-loader state was saved for {state.get('size')} prompts, "
                             f"this data set has {len(self.prompts)}")
        self.epoch, self.offset, self.seed = state["epoch"], state["offset"], state["seed"]
