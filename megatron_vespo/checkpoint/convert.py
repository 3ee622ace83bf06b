"""HF <-> Megatron checkpoint conversion for Qwen3-MoE, with optional logit verification.

``hf_to_mcore``: HF safetensors directory -> model checkpoint (dist_checkpointing, loads under
any layout). ``mcore_to_hf``: model checkpoint (or training checkpoint) -> HF directory that
SGLang and transformers load. Both run on every rank of a job whose layout is ``--tp/--ep/--pp``
(``launch_local`` starts the ranks on one machine; under torchrun they are already there).

Everything that can be checked before touching the output is checked first, identically on
every rank (architecture, shard files, tensor names and shapes, layout divisibility, output
directory), so bad input fails with a ValueError naming the file or setting and leaves nothing
behind. ``verify`` compares the logits of transformers' model and of our Megatron model on random
tokens before the output directory is renamed into place.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from megatron_vespo.checkpoint import dist
from megatron_vespo.checkpoint.hf_dir import (
    HFCheckpointReader,
    config_dtype,
    dtype_name,
    hf_dims,
    parse_dtype,
    save_hf_checkpoint,
)
from megatron_vespo.checkpoint.hf_weights import load_hf_weights, unwrap_model
from megatron_vespo.checkpoint.mapping import Qwen3MoeDims
from megatron_vespo.checkpoint.model_ckpt import (
    HF_SUBDIR,
    checkpoint_hf_config,
    load_model_checkpoint,
    read_checkpoint_meta,
    save_model_checkpoint,
)

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-5


def required_world_size(tp: int = 1, ep: int = 1, pp: int = 1, etp: Optional[int] = None) -> int:
    """Smallest world size that holds the layout: pp * lcm(tp, etp * ep)."""
    etp = etp or 1
    return pp * math.lcm(tp, etp * ep)


def parallel_config(tp: int = 1, ep: int = 1, pp: int = 1, etp: Optional[int] = None) -> Any:
    """The ``ParallelConfig`` of a conversion layout (expert TP defaults to 1 so TP and EP combine)."""
    from megatron_vespo.parallel.config import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          expert_model_parallel_size=ep, expert_tensor_parallel_size=etp or 1,
                          sequence_parallel=tp > 1)


def _world_size() -> int:
    if dist.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def conversion_model(hf_config_dir: str, parallel: Any, params_dtype: torch.dtype) -> Iterator[Any]:
    """``with conversion_model(dir, layout, dtype) as model:`` -- this rank's model under ``layout``.

    Validates the layout against the model's config.json, brings the layout up
    (:func:`megatron_vespo.parallel.state.parallel_session`) and tears it down on exit.
    """
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config, validate_layout
    from megatron_vespo.parallel.state import parallel_session

    hf_cfg = get_hf_config(ModelConfig(preset=None, hf_path=hf_config_dir))
    validate_layout(hf_cfg, parallel, world_size=_world_size())
    with parallel_session(parallel):
        yield build_gpt_model(hf_cfg, parallel, params_dtype=params_dtype)


# ----------------------------------------------------------------------------- verification
@torch.no_grad()
def megatron_logits(model: Any, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [B, S, V] of the (TP/EP-sharded) model on every rank (collective, PP=1)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("logit verification needs pipeline_model_parallel_size=1 (--pp 1)")
    gpt = unwrap_model(model)
    was_training = gpt.training
    gpt.eval()
    device = next(gpt.parameters()).device
    tokens = tokens.to(device)
    pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    try:
        logits = gpt(tokens, pos, None)
    finally:
        gpt.train(was_training)
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size].float().cpu()


def random_tokens(vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids (the same on every rank)."""
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def compare_with_transformers(model: Any, hf_dir: str | os.PathLike, dims: Qwen3MoeDims, *,
                              seq_len: int = 16, seed: int = 0) -> float:
    """Max |logit difference| between transformers' model loaded from ``hf_dir`` and ``model`` (collective).

    Rank 0 loads the HF model in float32 (compare an fp32 Megatron model); every rank returns the value.
    """
    tokens = random_tokens(dims.vocab_size, seq_len=seq_len, seed=seed)
    ours = megatron_logits(model, tokens, dims.vocab_size)
    diff = 0.0
    if dist.rank() == 0:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf_model(input_ids=tokens).logits.float()
        diff = float((ours - ref).abs().max())
        del hf_model
    return float(dist.broadcast_object(diff))


def _verifier(model: Any, dims: Qwen3MoeDims, tolerance: float, report: dict, *, hf_dir: Optional[str] = None,
              ckpt_dir: Optional[str] = None, config_dir: str = "", parallel: Any = None, hint: str = ""):
    """``verify_fn`` for the atomic writers: HF (``hf_dir``, default the directory being written) vs Megatron.

    Both sides run in float32. A model in bf16/fp16 is not upcast in place (Megatron's kernels
    follow ``config.params_dtype``): an fp32 twin is built and loaded from the Megatron checkpoint
    (``ckpt_dir``, default the directory being written), so the check also covers what is on disk.
    """
    def verify(tmp: Path) -> None:
        subject = model
        if next(unwrap_model(model).parameters()).dtype != torch.float32:
            from megatron_vespo.checkpoint.model_ckpt import load_model_checkpoint
            from megatron_vespo.models.config import ModelConfig
            from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config

            hf_cfg = get_hf_config(ModelConfig(preset=None, hf_path=config_dir))
            subject = build_gpt_model(hf_cfg, parallel, params_dtype=torch.float32)
            load_model_checkpoint(subject, ckpt_dir or tmp)
        diff = compare_with_transformers(subject, hf_dir or tmp, dims)
        report["max_abs_logit_diff"] = diff
        logger.info("verify: max |logit diff| transformers vs Megatron = %.3g (tolerance %.1g)", diff, tolerance)
        if not diff <= tolerance:
            raise ValueError(f"verification failed: max |logit diff| {diff:.3g} exceeds the tolerance {tolerance:g}"
                             + hint)
    return verify


# ----------------------------------------------------------------------------- conversions
def hf_to_mcore(hf_dir: str, out_dir: str, *, tp: int = 1, ep: int = 1, pp: int = 1, etp: Optional[int] = None,
                params_dtype: Optional[str] = None, verify: bool = False,
                tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Convert an HF Qwen3-MoE directory into a Megatron model checkpoint at ``out_dir`` (run on every rank).

    ``params_dtype`` defaults to the dtype in config.json. Returns a report dict.
    """
    cfg, dims = hf_dims(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    reader.validate_tensors(dims)
    dist.check_output_dir(out_dir)
    dtype = parse_dtype(params_dtype) or config_dtype(cfg) or torch.float32
    parallel = parallel_config(tp, ep, pp, etp)
    report: dict[str, Any] = {"hf_dir": str(hf_dir), "out": str(out_dir), "layout": dict(tp=tp, ep=ep, pp=pp),
                              "params_dtype": dtype_name(dtype)}
    with conversion_model(hf_dir, parallel, dtype) as model:
        load_hf_weights(model, reader, dims)
        save_model_checkpoint(model, out_dir, cfg, source_dir=hf_dir, extra_meta={"source": str(hf_dir)},
                              verify_fn=_verifier(model, dims, tolerance, report, hf_dir=hf_dir, config_dir=hf_dir,
                                                  parallel=parallel) if verify else None)
    logger.info("hf-to-mcore done: %s", report)
    return report


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A model checkpoint directory, a training ``iter_*`` directory, or a training save dir (-> latest)."""
    from megatron_vespo.checkpoint.training import latest_iteration_dir

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--ckpt {path} does not exist")
    if (path / "latest_checkpointed_iteration.txt").is_file():
        return latest_iteration_dir(path)
    return path


def mcore_to_hf(ckpt_dir: str, out_dir: str, *, tp: int = 1, ep: int = 1, pp: int = 1, etp: Optional[int] = None,
                dtype: Optional[str] = None, max_shard_bytes: int = 5 * 2**30, verify: bool = False,
                tolerance: float = DEFAULT_TOLERANCE, fp8_block: Optional[list] = None, engine_tp_size: int = 1,
                engine_ep_size: int = 1) -> dict:
    """Convert a Megatron model checkpoint into an HF directory at ``out_dir`` (run on every rank).

    The checkpoint loads under the given layout whatever layout saved it. ``dtype`` of the
    written weights defaults to the dtype in the stored config.json. ``fp8_block`` ([128, 128])
    writes block-FP8 linear weights for an FP8 engine of ``engine_tp_size`` / ``engine_ep_size``
    (checked first: every shard of that engine must be whole blocks; ``dtype`` is then the
    precision of the rest).
    """
    from megatron_vespo.fp8.blockwise import BlockFP8Format, check_block_layout

    ckpt = resolve_checkpoint_dir(ckpt_dir)
    meta = read_checkpoint_meta(ckpt)
    cfg, dims = checkpoint_hf_config(ckpt)
    fp8 = None
    if fp8_block is not None:
        check_block_layout(dims, fp8_block, engine_tp_size, engine_ep_size,
                           field=f"--fp8-blockwise --fp8-block-size {fp8_block[0]} {fp8_block[1]}")
        if verify:
            raise ValueError("--verify compares with transformers, which cannot load FP8 weights on CPU; "
                             "convert without --fp8-blockwise to verify, or compare with tests/fp8")
        fp8 = BlockFP8Format(block=tuple(fp8_block), dtype=parse_dtype(dtype))
    dist.check_output_dir(out_dir)
    parallel = parallel_config(tp, ep, pp, etp)
    report: dict[str, Any] = {"ckpt": str(ckpt), "out": str(out_dir), "layout": dict(tp=tp, ep=ep, pp=pp),
                              "saved_layout": meta.get("saved_layout")}
    lossy = dtype is not None and parse_dtype(dtype) not in (parse_dtype(meta["params_dtype"]), torch.float32)
    hint = (f" (the export rounds {meta['params_dtype']} weights to {dtype}: a difference of that size is "
            "expected; raise --tolerance to accept it)") if lossy else ""
    with conversion_model(str(ckpt / HF_SUBDIR), parallel, parse_dtype(meta["params_dtype"])) as model:
        load_model_checkpoint(model, ckpt)
        save_hf_checkpoint(model, cfg, out_dir, source_dir=str(ckpt / HF_SUBDIR), dtype=fp8 or dtype,
                           max_shard_bytes=max_shard_bytes,
                           verify_fn=_verifier(model, dims, tolerance, report, ckpt_dir=str(ckpt),
                                               config_dir=str(ckpt / HF_SUBDIR), parallel=parallel, hint=hint)
                           if verify else None)
    logger.info("mcore-to-hf done: %s", report)
    return report
