"""The staleness task: multi-operand addition with a scratchpad, for the staleness sweep (docs/results.md).

The two-operand task of ``tools/addition_task.py`` is learned in a few updates with 3-token
answers, too short and too easy for stale data to matter. Here a prompt adds ``--operands``
two-digit numbers and the response writes every running sum, comma-separated::

    prompt   "12+34+56+78+90+11="
    response "46,102,180,270,281"<eos>        (label = the same running sums, reward ``scratchpad``)

so responses are about 20 tokens (sequence log-ratios grow with length when data is stale) and a
single wrong digit anywhere in the chain ruins the answer: accuracy climbs over hundreds of RL
updates instead of a few. The ``scratchpad`` reward scores the characters right, position-wise.
Same 3.35M-parameter Qwen3-MoE as the addition task (hidden 128, 4 layers, 8 experts top-2),
one token per character of ``0-9 + = ,`` plus ``<pad> <bos> <eos>``.
``prepare`` writes:

* ``sft/``: the model after a brief supervised warm-up (``--sft-steps``), with its tokenizer;
* ``train.jsonl``: RL prompts ``{"prompt", "label"}``;
* ``eval.jsonl``: held-out prompts (disjoint from the SFT and RL problems), same fields;
* ``summary.json``: parameter count, SFT loss, greedy held-out accuracy after SFT.

    python tools/staleness_task.py prepare --out outputs/staleness_task
    megatron-vespo train examples/configs/cpu_addition_scratchpad.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from addition_task import EOS, MODEL_KW, PAD, SCRATCH_CHARS, SPECIALS, char_tokenizer, sft_step  # noqa: E402

logger = logging.getLogger("staleness_task")


def problem_sets(operands: int, n_train: int, n_eval: int, seed: int) -> tuple[list, list, list]:
    """Disjoint random problems (tuples of two-digit operands): SFT pool, RL prompts, held-out prompts."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()

    def draw(n: int) -> list[tuple[int, ...]]:
        out = []
        while len(out) < n:
            p = tuple(rng.randrange(10, 100) for _ in range(operands))
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    heldout = draw(n_eval)
    rl = draw(n_train)
    return draw(20_000), rl, heldout


def render(p: tuple[int, ...]) -> tuple[str, str]:
    """(prompt, scratchpad response) of one problem; the response is also the label of the
    ``scratchpad`` reward (fraction of running sums right; 1.0 = the final answer is right too)."""
    sums, acc = [], p[0]
    for x in p[1:]:
        acc += x
        sums.append(str(acc))
    return "+".join(map(str, p)) + "=", ",".join(sums)


def build_model(seed: int = 0):
    """The task's random-init Qwen3-MoE (the addition model with a 16-token vocabulary), fp32."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    kw = {**MODEL_KW, "vocab_size": len(SPECIALS) + len(SCRATCH_CHARS), "max_position_embeddings": 64}
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw)).float()


def sft(model, tok, pool: list, steps: int, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Teacher-forced warm-up on ``prompt + response + <eos>`` (loss on the response only), AdamW with a
    cosine decay of the learning rate to 5% over ``steps``."""
    import math

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    model.train()
    losses = []
    for step in range(steps):
        seqs, starts = [], []
        for p in (rng.choice(pool) for _ in range(batch)):
            prompt, resp = render(p)
            ids = tok.encode(prompt, add_special_tokens=False)
            seqs.append(ids + tok.encode(resp, add_special_tokens=False) + [EOS])
            starts.append(len(ids))
        losses.append(sft_step(model, opt, seqs, starts))
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("sft step %d/%d: loss %.3f", step + 1, steps, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(model, tok, problems: list, max_new_tokens: int = 40) -> float:
    """Fraction of ``problems`` whose greedy response ends in the right sum (batched, left-padded)."""
    ok = 0
    for i in range(0, len(problems), 64):
        chunk = problems[i:i + 64]
        enc = [tok.encode(render(p)[0], add_special_tokens=False) for p in chunk]
        width = max(map(len, enc))
        ids = torch.tensor([[PAD] * (width - len(e)) + e for e in enc])
        attn = (ids != PAD).long()
        out = model.generate(ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
        for p, row in zip(chunk, out[:, width:]):
            text = tok.decode(row, skip_special_tokens=True)
            ok += text.strip() == render(p)[1]
    return ok / max(len(problems), 1)


def write_jsonl(path: Path, problems: list) -> None:
    """``{"prompt", "label"}`` rows, written atomically."""
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as fh:
        for p in problems:
            prompt, label = render(p)
            fh.write(json.dumps({"prompt": prompt, "label": label}) + "\n")
    tmp.replace(path)


def prepare(out: Path, *, operands: int = 6, sft_steps: int = 3000, n_train: int = 4096, n_eval: int = 256,
            seed: int = 0) -> dict:
    """Write ``sft/``, ``train.jsonl``, ``eval.jsonl`` and ``summary.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer(SCRATCH_CHARS)
    model = build_model(seed)
    pool, rl, heldout = problem_sets(operands, n_train, n_eval, seed)
    t0 = time.perf_counter()
    losses = sft(model, tok, pool, sft_steps, seed=seed)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(out / "sft", safe_serialization=True)
    tok.save_pretrained(out / "sft")
    write_jsonl(out / "train.jsonl", rl)
    write_jsonl(out / "eval.jsonl", heldout)
    summary = {"params": sum(p.numel() for p in model.parameters()), "operands": operands, "sft_steps": sft_steps,
               "sft_seconds": round(time.perf_counter() - t0, 1), "sft_loss_last": losses[-1] if losses else None,
               "rl_prompts": len(rl), "eval_prompts": len(heldout),
               "greedy_eval_accuracy": greedy_accuracy(model, tok, heldout)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.info("wrote %s: %s", out, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python tools/staleness_task.py prepare --out DIR``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenizer + model + SFT warm-up + RL and held-out prompts")
    pp.add_argument("--out", default="outputs/staleness_task")
    pp.add_argument("--operands", type=int, default=6, help="two-digit operands per prompt")
    pp.add_argument("--sft-steps", type=int, default=3000, help="calibrated start (docs/results.md), ~30 min")
    pp.add_argument("--train-prompts", type=int, default=4096)
    pp.add_argument("--eval-prompts", type=int, default=256)
    pp.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    summary = prepare(Path(args.out), operands=args.operands, sft_steps=args.sft_steps, n_train=args.train_prompts,
                      n_eval=args.eval_prompts, seed=args.seed)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
