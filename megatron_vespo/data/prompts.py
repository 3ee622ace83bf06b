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


def load_jsonl_prompts(path: str | Path, prompt_key: str, label_key: str,
                       tokenize: Callable[[str], list[int]] | None, max_prompt_len: int) -> list[Prompt]:
    """Read prompts from a JSONL file; errors name the file, line and missing key.

    A prompt is text (tokenized with ``tokenize``) or a list of token ids (no tokenizer needed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    prompts: list[Prompt] = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if prompt_key not in row:
                raise ValueError(f"{path}:{lineno}: missing key '{prompt_key}' (data.prompt_key); "
                                 f"keys present: {sorted(row)}")
            if label_key not in row:
                # every reward compares against the label: a missing one would score 0 (or crash) mid-run
                raise ValueError(f"{path}:{lineno}: missing key '{label_key}' (data.label_key); "
                                 f"keys present: {sorted(row)}")
            text = row[prompt_key]
            if isinstance(text, str) and tokenize is None:
                raise ValueError(f"{path}:{lineno}: '{prompt_key}' is text but there is no tokenizer "
                                 "(model.hf_path without tokenizer files): give token ids (a list) or a model "
                                 "with a tokenizer")
            tokens = tokenize(text)[:max_prompt_len] if isinstance(text, str) else list(text)[:max_prompt_len]
            prompts.append(Prompt(tokens=tokens, label=row[label_key], index=len(prompts),
                                  text=text if isinstance(text, str) else None))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


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
            prompts = load_jsonl_prompts(cfg.path, cfg.prompt_key, cfg.label_key, tokenize, cfg.max_prompt_len)
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
