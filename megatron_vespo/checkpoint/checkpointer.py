"""What the training loop calls: resume at start-up, save on schedule (``CheckpointConfig``).

::

    ckpt = Checkpointer(job.checkpoint, actor.hf_cfg, source_dir=job.model.hf_path)
    state = ckpt.resume(actor.model, actor.optimizer, actor.scheduler)   # None: fresh start
    start = state["iteration"] if state else 0
    for it in range(start + 1, num_rollouts + 1):
        ...                                                          # one rollout step
        ckpt.maybe_save(it, actor.model, actor.optimizer, actor.scheduler,
                        state={"policy_version": version, "data": prompts.state_dict()})

``checkpoint.load`` may name a Hugging Face directory (weights are imported directly, no
conversion step), a model checkpoint from ``convert hf-to-mcore``, or a training checkpoint
(save dir or ``iter_*``). With ``load`` unset, a ``save_dir`` that already holds a complete
checkpoint is resumed automatically, so a preempted job restarts where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from megatron_vespo.checkpoint import dist
from megatron_vespo.checkpoint.config import CheckpointConfig
from megatron_vespo.checkpoint.training import LATEST_NAME, iteration_dir, latest_iteration

logger = logging.getLogger(__name__)


def classify_checkpoint(path: str | Path) -> str:
    """``"hf"``, ``"model"`` (converted weights), ``"training"`` (save dir or iter dir); ValueError otherwise."""
    from megatron_vespo.checkpoint.model_ckpt import META_NAME

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint.load {path} does not exist")
    if (path / LATEST_NAME).is_file() or (path / "trainer_state.pt").is_file():
        return "training"
    if (path / META_NAME).is_file():
        return "model"
    if (path / "config.json").is_file():
        return "hf"
    raise ValueError(f"checkpoint.load {path}: neither a training checkpoint ({LATEST_NAME} or trainer_state.pt), "
                     f"a model checkpoint ({META_NAME}) nor a Hugging Face directory (config.json)")


class Checkpointer:
    """Resume and periodic saves of the actor as ``CheckpointConfig`` says (every call is collective)."""

    def __init__(self, cfg: CheckpointConfig, hf_cfg: Any, *, source_dir: Optional[str] = None) -> None:
        """``hf_cfg`` is stored with every checkpoint; ``source_dir`` (the HF base model) supplies tokenizer files."""
        self.cfg, self.hf_cfg, self.source_dir = cfg, hf_cfg, source_dir
        self._rng: Optional[dict] = None

    def clean(self) -> None:
        """Collective: remove what killed saves left in ``save_dir`` (see ``training.clean_save_dir``)."""
        from megatron_vespo.checkpoint.training import clean_save_dir

        if self.cfg.save_dir and dist.rank() == 0:
            clean_save_dir(self.cfg.save_dir, keep=self.cfg.load)
        dist.barrier()

    def reapply_rng(self) -> None:
        """Set the RNG streams to the resumed checkpoint's states again (no-op on a fresh start).

        The loop calls it after starting the engines, just before the first iteration: whatever
        drew random numbers between the load and that point (an in-process engine building its
        model, say) would otherwise shift every later draw of the resumed run.
        """
        from megatron_vespo.checkpoint.training import set_rng_state

        if self._rng is not None:
            set_rng_state(self._rng)

    def resume(self, model: Any, optimizer: Any = None, scheduler: Any = None) -> Optional[dict]:
        """Load ``checkpoint.load`` (or an existing ``save_dir``); returns the saved trainer state or None."""
        from megatron_vespo.checkpoint.training import load_trainer_checkpoint, read_rng_state, resolve_checkpoint

        self.clean()
        path = self.cfg.load
        if path is None and self.cfg.save_dir and (Path(self.cfg.save_dir) / LATEST_NAME).is_file():
            path = self.cfg.save_dir
            logger.info("resuming the run in checkpoint.save_dir %s", path)
        if path is None:
            return None
        kind = classify_checkpoint(path)
        if kind != "training":
            self.load_weights(model, path, optimizer)
            return None
        state = load_trainer_checkpoint(path, model=model, optimizer=optimizer if self.cfg.load_optimizer else None,
                                        scheduler=scheduler if self.cfg.load_optimizer else None,
                                        load_rng=self.cfg.load_rng)
        if self.cfg.load_rng:
            self._rng = read_rng_state(resolve_checkpoint(path))
        if optimizer is not None and not self.cfg.load_optimizer:
            optimizer.reload_model_params()  # fresh optimizer: its main params must be the loaded weights
        return state

    def load_weights(self, model: Any, path: str, optimizer: Any = None) -> None:
        """Load weights only (an HF directory or a converted model checkpoint) into a built model.

        The optimizer, if given, already holds main (fp32) copies of the *initial* weights for
        bf16/fp8 models and with the distributed optimizer; they are refreshed from the loaded
        weights, else the first step would write the random init back.
        """
        from megatron_vespo.checkpoint.model_ckpt import load_model_checkpoint

        if classify_checkpoint(path) == "hf":
            self._load_hf(model, path)
        else:
            load_model_checkpoint(model, path)
        if optimizer is not None:
            optimizer.reload_model_params()

    @staticmethod
    def _load_hf(model: Any, hf_dir: str) -> None:
        from megatron_vespo.checkpoint.hf_dir import HFCheckpointReader, hf_dims
        from megatron_vespo.checkpoint.hf_weights import load_hf_weights

        _, dims = hf_dims(hf_dir)
        reader = HFCheckpointReader(hf_dir)
        reader.validate_tensors(dims)
        load_hf_weights(model, reader, dims)
        logger.info("loaded Hugging Face weights from %s", hf_dir)

    def due(self, iteration: int) -> tuple[bool, bool]:
        """(training checkpoint due, HF export due) at ``iteration``."""
        c = self.cfg
        return (bool(c.save_interval) and iteration % c.save_interval == 0,
                bool(c.hf_export_interval) and iteration % c.hf_export_interval == 0)

    def maybe_save(self, iteration: int, model: Any, optimizer: Any = None, scheduler: Any = None, *,
                   state: Optional[dict] = None, force: bool = False) -> list[Path]:
        """Save what is due at ``iteration`` (``force``: a training checkpoint regardless); returns the paths."""
        from megatron_vespo.checkpoint.hf_dir import save_hf_checkpoint
        from megatron_vespo.checkpoint.training import save_trainer_checkpoint

        ckpt_due, hf_due = self.due(iteration)
        written = []
        # the HF export first: a kill during it leaves the pointer on the previous iteration, so the
        # resumed run writes both again (the other order would lose this iteration's export)
        if hf_due and self.cfg.save_dir:
            out = Path(self.cfg.save_dir) / "hf" / f"iter_{iteration:07d}"
            if not out.exists():
                written.append(save_hf_checkpoint(model, self.hf_cfg, out, source_dir=self.source_dir,
                                                  dtype=self.cfg.hf_export_dtype))
        if (ckpt_due or force) and self.cfg.save_dir:
            latest = latest_iteration(self.cfg.save_dir)
            if iteration_dir(self.cfg.save_dir, iteration).exists() and latest is not None and iteration <= latest:
                # confirmed by the pointer (a newer, unconfirmed one is replaced by save_trainer_checkpoint)
                logger.info("checkpoint for iteration %d already exists; not saved again", iteration)
            else:
                written.append(save_trainer_checkpoint(
                    self.cfg.save_dir, iteration, model=model, hf_cfg=self.hf_cfg, optimizer=optimizer,
                    scheduler=scheduler, state=state, keep_last=self.cfg.keep_last, source_dir=self.source_dir))
        dist.barrier()
        return written
