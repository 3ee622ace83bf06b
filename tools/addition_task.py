"""The CPU addition task: a character tokenizer, a 3.35M-parameter Qwen3-MoE, "a+b=" prompts, SFT warm-up.

A first RL run whose outputs a person can read: the policy completes ``"17+25="`` with digits
and an end-of-sequence token, and the ``math`` reward (math-verify) scores the answer. Prepare
everything once (about a minute on two cores)::

    python tools/addition_task.py prepare --out outputs/cpu_addition

which writes ``outputs/cpu_addition/``:

* ``base/``: the random-init model (hidden 128, 4 layers, 8 experts top-2, 15-token vocabulary)
  with its tokenizer (``<pad> <bos> <eos> 0-9 + =``, one token per character);
* ``sft/``: the same model after ``--sft-steps`` steps of supervised warm-up on ``a+b=c<eos>``
  (teacher forcing, loss on the answer only), so RL starts from a policy that answers in the
  right format and is sometimes right;
* ``train.jsonl``: RL prompts ``{"prompt": "a+b=", "label": "c"}`` (operands below
  ``--max-operand``, disjoint from the SFT sums' held-out quarter).

Then ``megatron-vespo train examples/configs/cpu_addition_sync.yaml`` (or ``..._async.yaml``).
``tools/bench_pipeline.py`` uses the same files for its throughput comparison with TRL.
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

logger = logging.getLogger("addition_task")

CHARS = list("0123456789+=")
SCRATCH_CHARS = CHARS + [","]  # the scratchpad variant separates partial sums with commas
SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2

MODEL_KW = dict(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False,
                hidden_act="silu", initializer_range=0.02, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})


def char_tokenizer(chars: list[str] = CHARS):
    """An HF fast tokenizer with one token per character of ``chars`` (default ``0-9 + =``) plus
    ``<pad> <bos> <eos>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<pad>", clean_up_tokenization_spaces=False)


def build_model(seed: int = 0):
    """The random-init Qwen3-MoE of the task (3.35M parameters, fp32)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**MODEL_KW)).float()


def problems(max_operand: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All (a, b) pairs below ``max_operand``, shuffled and split 3:1 into SFT and RL problems."""
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(pairs)
    cut = len(pairs) * 3 // 4
    return pairs[:cut], pairs[cut:]


def sft_step(model, opt, seqs: list[list[int]], starts: list[int]) -> float:
    """One teacher-forced step on right-padded ``seqs`` (token ids), the loss on tokens from
    ``starts[i]`` on (the answer), gradient norm clipped to 1; returns the loss."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        labels[i, p:len(s)] = torch.tensor(s[p:])
    loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def sft(model, tok, pairs: list[tuple[int, int]], steps: int, batch: int = 64, lr: float = 3e-3,
        seed: int = 0) -> list[float]:
    """Teacher-forced warm-up on ``a+b=c<eos>`` (loss on the answer and EOS only); returns the losses."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        rows = [rng.choice(pairs) for _ in range(batch)]
        seqs, starts = [], []
        for a, b in rows:
            prompt = tok.encode(f"{a}+{b}=", add_special_tokens=False)
            seqs.append(prompt + tok.encode(str(a + b), add_special_tokens=False) + [EOS])
            starts.append(len(prompt))
        losses.append(sft_step(model, opt, seqs, starts))
        if step % 50 == 0 or step == steps - 1:
            logger.info("sft step %d/%d: loss %.3f", step + 1, steps, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(model, tok, pairs: list[tuple[int, int]], max_new_tokens: int = 8) -> float:
    """Fraction of ``pairs`` answered exactly by greedy decoding."""
    ok = 0
    for a, b in pairs:
        ids = torch.tensor([tok.encode(f"{a}+{b}=", add_special_tokens=False)])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS,
                             pad_token_id=PAD)
        ok += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == str(a + b)
    return ok / max(len(pairs), 1)


def prepare(out: Path, *, max_operand: int = 50, sft_steps: int = 300, seed: int = 0) -> dict:
    """Write ``base/``, ``sft/`` and ``train.jsonl`` under ``out``; returns a summary."""
    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    model = build_model(seed)
    n_params = sum(p.numel() for p in model.parameters())
    for name in ("base", "sft"):
        if name == "sft":
            sft_pairs, _ = problems(max_operand, seed)
            t0 = time.perf_counter()
            losses = sft(model, tok, sft_pairs, sft_steps, seed=seed)
            logger.info("SFT: %d steps in %.1fs, loss %.3f -> %.3f", sft_steps, time.perf_counter() - t0,
                        losses[0], losses[-1])
        model.generation_config.eos_token_id = EOS
        model.generation_config.pad_token_id = PAD
        model.save_pretrained(out / name, safe_serialization=True)
        tok.save_pretrained(out / name)
    _, rl_pairs = problems(max_operand, seed)
    tmp = out / "train.jsonl.tmp"
    with tmp.open("w") as fh:
        for a, b in rl_pairs:
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "label": str(a + b)}) + "\n")
    tmp.replace(out / "train.jsonl")
    acc = greedy_accuracy(model, tok, rl_pairs[:64])
    summary = {"params": n_params, "rl_prompts": len(rl_pairs), "sft_steps": sft_steps,
               "greedy_accuracy_on_rl_prompts": acc}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.info("wrote %s: %s", out, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python tools/addition_task.py prepare --out DIR``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenizer + model + SFT warm-up + RL prompts")
    pp.add_argument("--out", default="outputs/cpu_addition")
    pp.add_argument("--max-operand", type=int, default=50, help="operands are drawn from [0, max-operand)")
    pp.add_argument("--sft-steps", type=int, default=300)
    pp.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    summary = prepare(Path(args.out), max_operand=args.max_operand, sft_steps=args.sft_steps, seed=args.seed)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
