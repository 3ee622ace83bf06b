"""CPU generation engine behind the embedded server: HF transformers model, our decode loop.

Why not ``model.generate``: we need, per sampled token, the log-prob of SGLang's convention
(``sampling.py``), and per forward the experts every router chose for every real token. Neither
comes out of ``generate`` (its ``output_scores`` are processed scores of the truncated
distribution, and it has no router output), and a per-request seeded sampler with per-step
abort / pause checks needs the loop in our hands anyway. The loop is the standard one: a
left-padded prefill with position ids from the attention mask, then one token per step with
a ``DynamicCache``; finished rows are dropped from the batch and the cache.

Scheduling is one batch at a time on a worker thread: requests queue, the worker takes up to
``max_batch_size`` of them and runs them to completion (no continuous batching). Control calls
(weight updates, version changes) run on the same thread between batches, or between decode steps
while generation is paused in place -- SGLang's semantics for ``pause_generation(in_place)``.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional

from megatron_vespo.rollout.embedded.capture import route_capture_or_none
from megatron_vespo.rollout.embedded.decode import BatchDecoding, abort_result
from megatron_vespo.rollout.embedded.models import (
    build_tiny_model,
    load_hf_model,
    load_tokenizer,
    reload_weights_in_place,
)
from megatron_vespo.rollout.embedded.requests import GenRequest, parse_generate
from megatron_vespo.rollout.embedded.sampling import return_original_logprob_from_env
from megatron_vespo.rollout.embedded.weight_update import WeightUpdateGroups, load_named_tensors

logger = logging.getLogger(__name__)


def _eos_ids(model: Any) -> set[int]:
    ids: set[int] = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return {int(i) for i in ids}


class EmbeddedEngine(BatchDecoding):
    """Batched sampling with KV cache, SGLang log-prob convention and router capture.

    Args:
        model: an HF causal LM (Qwen3-MoE for route capture), in eval mode.
        model_path: where it was loaded from (reported by ``model_info``).
        tokenizer: optional; enables ``text`` input and text output.
        weight_version: initial version string (SGLang's default is ``"default"``).
        random_seed: seeds requests without ``sampling_seed`` (in arrival order).
        max_batch_size: requests per batch.
        batch_wait_s: after the first queued request, wait this long for more to join its batch
            (concurrent HTTP requests arrive a few ms apart; without it the first runs alone).
            Rows of one batched ``/generate`` arrive together and start at once
            (``submit(..., complete=True)``).
        return_original_logprob: report raw log-probs (default: ``SGLANG_RETURN_ORIGINAL_LOGPROB``).
    """

    def __init__(self, model: Any, *, model_path: Optional[str] = None, tokenizer: Any = None,
                 weight_version: str = "default", random_seed: int = 0, max_batch_size: int = 64,
                 batch_wait_s: float = 0.02, return_original_logprob: Optional[bool] = None,
                 fp8_weights: Optional[str] = None):
        self.model = model.eval()
        self.fp8_weights = fp8_weights  # emulate an FP8 engine: round linear weights after every load
        self._round_fp8()
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.capture = route_capture_or_none(model)
        self.vocab_size = int(model.config.vocab_size)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 1 << 20))
        self.eos_ids = _eos_ids(model)
        self.weight_version = str(weight_version)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.random_seed = random_seed
        self.original_logprob = (return_original_logprob_from_env() if return_original_logprob is None
                                 else return_original_logprob)
        self.generated_tokens = 0
        self._rng = random.Random(random_seed)
        self._cv = threading.Condition()
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._complete = False  # the queue holds a whole batched request: no batching wait
        self._running: list[GenRequest] = []
        self._controls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._paused = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.weight_groups = WeightUpdateGroups()  # /init_weights_update_group & co.

    @classmethod
    def from_pretrained(cls, model_path: str, dtype: str = "float32", **kwargs: Any) -> "EmbeddedEngine":
        """Engine over an HF checkpoint directory (tokenizer loaded if the directory has one)."""
        return cls(load_hf_model(model_path, dtype), model_path=str(model_path), tokenizer=load_tokenizer(model_path),
                   **kwargs)

    @classmethod
    def from_preset(cls, preset: str = "tiny", seed: int = 0, dtype: str = "float32",
                    **kwargs: Any) -> "EmbeddedEngine":
        """Engine over a random-weight ``models.presets`` model."""
        return cls(build_tiny_model(preset, seed=seed, dtype=dtype), model_path=f"preset:{preset}", **kwargs)

    def _round_fp8(self) -> None:
        """``fp8_weights`` (tensorwise | blockwise | mxfp8): FP8-round the linear weights, as an FP8
        engine quantising BF16 weights would (``fp8_weights.emulate_weights_``)."""
        if self.fp8_weights:
            from megatron_vespo.rollout.embedded.fp8_weights import emulate_weights_

            emulate_weights_(self.model, self.fp8_weights)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "EmbeddedEngine":
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="embedded-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Abort everything and stop the worker."""
        self.abort(abort_all=True, message="engine shutting down")
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.weight_groups.destroy_all()

    @property
    def busy(self) -> bool:
        """A batch is running."""
        return bool(self._running)

    @property
    def paused(self) -> bool:
        """``pause_generation`` is in effect."""
        return self._paused

    # ------------------------------------------------------------------ requests
    def parse(self, body: dict) -> tuple[list[GenRequest], bool]:
        """Validate a ``/generate`` body (ValueError naming the field)."""
        tokenize = None if self.tokenizer is None else (lambda t: self.tokenizer.encode(t))
        reqs, batched = parse_generate(body, vocab_size=self.vocab_size, max_len=self.max_len, tokenize=tokenize)
        if any(r.return_routed_experts for r in reqs) and self.capture is None:
            raise ValueError("return_routed_experts=true but the served model has no MoE router")
        return reqs, batched

    def submit(self, reqs: list[GenRequest], complete: bool = False) -> None:
        """Queue requests; each signals ``req.done`` (and calls ``req.on_done``) when finished.

        ``complete``: ``reqs`` is a whole batch (one batched ``/generate``): the worker starts it
        without waiting ``batch_wait_s`` for others to join.
        """
        with self._cv:
            if self._stopping:
                raise RuntimeError("engine is shut down")
            self._pending.extend(reqs)
            self._complete = self._complete or complete
            self._cv.notify_all()

    def decode(self, ids: list[int]) -> str:
        """Token ids to text (needs a tokenizer)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, rows: list[list[int]]) -> list[str]:
        """``decode`` of each row. A fast tokenizer that adds no clean-up decodes the batch in one
        Rust call (5x faster than a ``decode`` per row on 64 rows, issue 15); its text is the same
        (``tests/rollout/test_wire_speedups.py`` checks it against ``decode``)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            return backend.decode_batch(rows, skip_special_tokens=True)
        return [self.decode(r) for r in rows]

    def abort(self, rid: str = "", abort_all: bool = False, message: str = "Aborted") -> int:
        """Abort matching queued requests now and running ones at their next step; returns how many."""
        with self._cv:
            hit = [r for r in list(self._pending) + self._running
                   if abort_all or r.rid == rid or (rid and r.rid.startswith(rid + "_"))]
            for r in hit:
                r.aborted = message
            queued = [r for r in hit if r in self._pending]
            for r in queued:
                self._pending.remove(r)
            self._cv.notify_all()
        for r in queued:
            r.finish(abort_result(message))
        return len(hit)

    def pause(self, mode: str = "abort") -> None:
        """SGLang ``pause_generation``: ``abort`` aborts everything first; ``in_place`` / ``retract`` freeze
        running requests between steps (we keep their KV cache, so retract behaves as in_place)."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode must be abort, retract or in_place, got {mode!r}")
        if mode == "abort":
            self.abort(abort_all=True, message="Abort by pause_generation")
        with self._cv:
            self._paused = True
            self._cv.notify_all()

    def resume(self) -> None:
        """SGLang ``continue_generation``."""
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    # ------------------------------------------------------------------ control
    def call_control(self, fn: Callable[[], Any], timeout_s: Optional[float] = None) -> Any:
        """Run ``fn`` on the worker thread when no decode step is in flight; returns its result."""
        if self._thread is None:
            return fn()
        fut: Future = Future()
        with self._cv:
            self._controls.append((fn, fut))
            self._cv.notify_all()
        return fut.result(timeout=timeout_s)

    def update_weights_from_disk(self, model_path: str, weight_version: Optional[str] = None,
                                 abort_all_requests: bool = False) -> tuple[bool, str, int]:
        """Load an HF checkpoint into the served model; ``(success, message, num_paused_requests)``."""
        if abort_all_requests:
            self.abort(abort_all=True, message="Abort by update_weights_from_disk")

        def do() -> tuple[bool, str, int]:
            try:
                n = reload_weights_in_place(self.model, model_path)
            except (ValueError, OSError) as exc:
                return False, f"Failed to update weights: {exc}", 0
            self._round_fp8()
            self.model_path = str(model_path)
            if weight_version is not None:
                self._set_version(str(weight_version))
            logger.info("loaded %d tensors from %s (weight_version %s)", n, model_path, self.weight_version)
            return True, "Succeeded to update model weights.", len(self._running) if self._paused else 0
        return self.call_control(do)

    def load_weights(self, named_tensors: list, weight_version: Optional[str] = None,
                     abort_all_requests: bool = False) -> tuple[bool, str]:
        """Copy ``(checkpoint name, tensor)`` pairs into the served model between decode steps
        (all or nothing, ``weight_update.load_named_tensors``); ``(success, message)``."""
        if abort_all_requests:
            self.abort(abort_all=True, message="Abort by weight update")

        def do() -> tuple[bool, str]:
            try:
                load_named_tensors(self.model, named_tensors)
            except ValueError as exc:
                return False, f"Failed to update parameter online: {exc}"
            self._round_fp8()
            if weight_version is not None:
                self._set_version(str(weight_version))
            return True, "Succeeded to update parameter online."
        return self.call_control(do)

    def update_weight_version(self, new_version: str) -> None:
        """Retag the served weights."""
        self.call_control(lambda: self._set_version(str(new_version)))

    def _set_version(self, version: str) -> None:
        self.weight_version = version
        for r in self._running:  # paused in place: later tokens come from the new weights
            if r.finish_reason is None and r.version_spans and r.version_spans[-1][0] != version:
                r.version_spans.append([version, len(r.output_ids)])

    def _run_controls(self) -> None:
        while True:
            with self._cv:
                if not self._controls:
                    return
                fn, fut = self._controls.popleft()
            try:
                fut.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(exc)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._controls and (self._paused or not self._pending):
                    self._cv.wait()
                if self._stopping:
                    return
            self._run_controls()
            with self._cv:
                deadline = time.monotonic() + self.batch_wait_s  # let concurrent arrivals join the batch
                while (self._pending and len(self._pending) < self.max_batch_size and not self._stopping
                       and not self._complete and deadline > time.monotonic()):
                    self._cv.wait(timeout=deadline - time.monotonic())
                if self._paused or not self._pending:
                    continue
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
                self._complete = self._complete and bool(self._pending)  # the rest of a big batch: no wait
                self._running = batch
            try:
                self.run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - a failing batch must not kill the server
                logger.exception("embedded engine batch failed")
                for r in batch:
                    if r.finish_reason is None:
                        r.finish({**abort_result(f"engine error: {type(exc).__name__}: {exc}"), "status_code": 500})
            finally:
                with self._cv:
                    self._running = []

    def _gate(self, reqs: list[GenRequest]) -> None:
        """Before each decode step: wait while paused (running control calls meanwhile).

        Returns early when one of ``reqs`` is aborted, so an abort answers during a pause.
        """
        while True:
            self._run_controls()
            with self._cv:
                if not self._paused or self._stopping or any(r.aborted for r in reqs):
                    return
                self._cv.wait(timeout=0.05)

    # ------------------------------------------------------------------ info
    def model_info(self) -> dict:
        """SGLang ``/model_info`` fields, plus the MoE dims a client needs to decode routes."""
        cfg = self.model.config
        info: dict[str, Any] = {
            "model_path": self.model_path, "tokenizer_path": self.model_path if self.tokenizer else None,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": self.weight_version,
            "model_type": getattr(cfg, "model_type", None), "architectures": getattr(cfg, "architectures", None),
            "num_hidden_layers": int(cfg.num_hidden_layers), "vocab_size": self.vocab_size,
        }
        if self.capture is not None:
            spec = self.capture.spec
            info.update(num_experts=spec.num_experts, num_experts_per_tok=spec.topk,
                        mlp_only_layers=[i for i in range(spec.num_layers) if i not in spec.moe_layers])
        return info
