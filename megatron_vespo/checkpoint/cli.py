"""``megatron-vespo convert``: HF <-> Megatron checkpoint conversion.

::

    megatron-vespo convert hf-to-mcore --hf-dir Qwen3-30B-A3B-Base --out ckpt/base [--tp 1 --ep 8 --pp 1]
    megatron-vespo convert mcore-to-hf --ckpt ckpt/run/ --out hf/step100 [--ep 8] [--dtype bfloat16]
    megatron-vespo convert mcore-to-hf --ckpt ckpt/run/ --out hf/step100-fp8 --fp8-blockwise --engine-tp-size 4

The layout flags choose how the model is sharded *while converting* (a Megatron checkpoint
loads under any layout afterwards). The ranks are started here on this machine (``--nproc``,
default: the layout's size); under ``torchrun`` the command uses the ranks torchrun started.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"500MiB"``, ``"1048576"``; ValueError names the argument."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: use e.g. 5GB, 500MB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _add_layout(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layout while converting (any layout loads the result)")
    g.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert-model-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    g.add_argument("--etp", type=int, default=None, help="expert-tensor-parallel size (default 1)")
    g.add_argument("--nproc", type=int, default=None,
                   help="processes to start on this machine (default: pp * lcm(tp, etp * ep); ignored under torchrun)")
    v = p.add_argument_group("verification")
    v.add_argument("--verify", action="store_true",
                   help="compare transformers and Megatron logits on random tokens; fail above --tolerance")
    v.add_argument("--tolerance", type=float, default=1e-5, help="max |logit difference| accepted by --verify")


def register(subparsers: Any) -> None:
    """Add ``convert`` with the ``hf-to-mcore`` and ``mcore-to-hf`` verbs."""
    conv = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron formats",
                                 description=__doc__.splitlines()[0])
    verbs = conv.add_subparsers(dest="verb", metavar="VERB", required=True)
    h2m = verbs.add_parser("hf-to-mcore", help="HF safetensors directory -> Megatron dist checkpoint")
    h2m.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    h2m.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    h2m.add_argument("--params-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="Megatron parameter dtype (default: the dtype in config.json)")
    _add_layout(h2m)
    h2m.set_defaults(func=_handle)
    m2h = verbs.add_parser("mcore-to-hf", help="Megatron model/training checkpoint -> HF safetensors directory")
    m2h.add_argument("--ckpt", required=True,
                     help="model checkpoint dir, training iter_* dir, or training save dir (latest iteration)")
    m2h.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    m2h.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="dtype of the written weights (default: the dtype in the stored config.json)")
    m2h.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9, help="safetensors shard size limit")
    f8 = m2h.add_argument_group("block FP8 for an FP8 rollout engine (docs/fp8.md)")
    f8.add_argument("--fp8-blockwise", action="store_true",
                    help="write linear weights as float8_e4m3fn + float32 weight_scale_inv per block and a "
                         "quantization_config (SGLang's block-FP8 layout); the rest in --dtype (default bfloat16)")
    f8.add_argument("--fp8-block-size", type=int, nargs=2, default=[128, 128], metavar=("N", "K"),
                    help="weight block [block_n, block_k] (default 128 128)")
    f8.add_argument("--engine-tp-size", type=int, default=1,
                    help="TP size of the engine that will serve the FP8 weights (checked: every shard whole blocks)")
    f8.add_argument("--engine-ep-size", type=int, default=1, help="its expert-parallel size (experts split over tp/ep)")
    _add_layout(m2h)
    m2h.set_defaults(func=_handle)


def run_conversion(verb: str, kwargs: dict) -> dict:
    """Body of one rank: run ``verb`` (``hf-to-mcore`` / ``mcore-to-hf``) with ``kwargs``; returns the report."""
    if not logging.getLogger().handlers:  # spawned ranks do not inherit the CLI's logging setup
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_vespo.checkpoint import convert

    fn = convert.hf_to_mcore if verb == "hf-to-mcore" else convert.mcore_to_hf
    return fn(**kwargs)


def _handle(args: argparse.Namespace) -> int:
    from megatron_vespo.checkpoint.convert import required_world_size
    from megatron_vespo.checkpoint.dist import launch_local

    layout = dict(tp=args.tp, ep=args.ep, pp=args.pp, etp=args.etp)
    for name, value in layout.items():
        if value is not None and value < 1:
            logger.error("--%s must be >= 1, got %d", name, value)
            return 2
    common = dict(out_dir=args.out, verify=args.verify, tolerance=args.tolerance, **layout)
    if args.verb == "hf-to-mcore":
        kwargs = dict(hf_dir=args.hf_dir, params_dtype=args.params_dtype, **common)
    else:
        kwargs = dict(ckpt_dir=args.ckpt, dtype=args.dtype, max_shard_bytes=args.max_shard_size, **common)
        if args.fp8_blockwise:
            kwargs.update(fp8_block=args.fp8_block_size, engine_tp_size=args.engine_tp_size,
                          engine_ep_size=args.engine_ep_size)
    nproc = args.nproc or required_world_size(args.tp, args.ep, args.pp, args.etp)
    try:
        report = launch_local(run_conversion, nproc, args.verb, kwargs)
    except ValueError as exc:
        logger.error("convert %s failed: %s", args.verb, exc)
        return 2
    logger.info("convert %s: %s", args.verb, json.dumps(report, default=str))
    return 0
