"""Build every distinct rank's model shard at full size on the ``meta`` device, under a fake cluster.

For each class of ranks with the same (TP, PP, EP, expert-TP) coordinates, the first rank of the
class joins torch's fake process group (``torch.testing._internal.distributed.fake_pg``:
``init_process_group("fake", store=FakeStore(), rank=r, world_size=W)``), megatron-core's
``parallel_state`` is initialised with the job's layout, and the project's own builder
(``models.qwen3_moe.build_gpt_model``, CPU compat layer on) builds the rank's ``GPTModel`` inside
``torch.device("meta")``: real modules and shapes, no memory. Coordinates of all W ranks come from
megatron-core's ``RankGenerator`` (the generator ``initialize_model_parallel`` uses), so a
2-node layout builds only its 16 distinct shards, not one per GPU.

On the built shards the HF mapping runs as in a real job:

* export: ``checkpoint.hf_weights.iter_hf_weights`` on rank 0's shard (its TP/EP all-gathers run on
  the fake group; meta tensors keep the shapes), giving every HF name, shape and bucket;
* import: ``checkpoint.hf_weights.load_hf_weights`` on every shard with a reader serving meta tensors
  of the checkpoint index, recording which HF tensors each rank consumes.

The fake group echoes a rank's own object for ``all_gather_object``; the two mapping calls that
gather objects across ranks (the import coverage check, the export's pipeline-owner table) get
the other ranks' answers from the shards built before (``_gather_from_shards``), which is what
the real collective would return.

Transformer Engine cannot be imported here, so the shards use megatron-core's local spec. The TE
spec has the same parameters under other names (input norms fused into ``linear_qkv`` /
``linear_fc1`` as ``layer_norm_weight``, experts as ``TEGroupedMLP`` ``weight{j}``), which
``checkpoint.mapping.canonical_name`` maps onto the same canonical names.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

SPEC_NOTE = ("megatron-core local spec (transformer_engine is not importable on this machine); the TE spec "
             "holds the same parameters under names canonical_name() maps onto these")


@dataclass
class Shard:
    """One distinct rank's shard: coordinates, the global ranks sharing them, exact counts."""

    rank: int  # the representative global rank that was built
    ranks: list[int]
    tp: int
    pp: int
    ep: int
    etp: int
    params: int = 0
    expert_params: int = 0
    vocab_params: int = 0  # embedding + output layer (with vocabulary padding)
    half_params: int = 0  # 16-bit parameters (the optimizer keeps fp32 main copies of these)
    half_expert_params: int = 0
    param_bytes: int = 0
    layers: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # canonical Megatron names held
    build_s: float = 0.0

    @property
    def dense_params(self) -> int:
        """Non-expert parameters (attention, norms, router, embedding, output layer)."""
        return self.params - self.expert_params


@dataclass
class BuildResult:
    """What :func:`build_shards` measured (plain data, JSON-friendly)."""

    world_size: int
    shards: list[Shard]
    total_padded: int  # Megatron total, each parameter once, vocabulary padding included
    total: int  # the same without vocabulary padding (= the HF model's count)
    expert_total: int
    export: dict[str, tuple]  # HF name -> shape, as the export produced it
    export_buckets: list[tuple[int, int]]  # (tensors, bytes) per bucket, in order
    export_collectives: dict[str, int]
    imported: list[str]  # HF names consumed by the import, over all shards
    import_reads: int  # HF tensor reads summed over shards (a tensor is read by each rank that holds a part)
    spec: str = SPEC_NOTE
    build_s: float = 0.0


def rank_coordinates(parallel: Any, world_size: int) -> dict[int, tuple[int, int, int, int]]:
    """``{global rank: (tp, pp, ep, etp)}`` as megatron-core's ``initialize_model_parallel`` assigns them."""
    from megatron.core.parallel_state import RankGenerator

    tp, pp, ep = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.expert_model_parallel_size)
    etp, cp = parallel.expert_tensor_parallel_size or tp, parallel.context_parallel_size
    order = "tp-cp-ep-dp-pp"  # initialize_model_parallel's default
    dense = RankGenerator(tp=tp, ep=1, dp=world_size // (tp * pp * cp), pp=pp, cp=cp, order=order)
    expert = RankGenerator(tp=etp, ep=ep, dp=world_size // (etp * ep * pp), pp=pp, cp=1, order=order)

    def index_in(gen: Any, token: str) -> dict[int, int]:
        return {r: i for group in gen.get_ranks(token) for i, r in enumerate(group)}

    tp_of, pp_of, ep_of, etp_of = index_in(dense, "tp"), index_in(dense, "pp"), index_in(expert, "ep"), \
        index_in(expert, "tp")
    return {r: (tp_of[r], pp_of[r], ep_of[r], etp_of[r]) for r in range(world_size)}


@contextlib.contextmanager
def fake_rank(parallel: Any, rank: int, world_size: int) -> Iterator[None]:
    """Join the fake process group as ``rank`` of ``world_size`` and initialise ``parallel_state``."""
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size,
            create_gloo_process_groups=False)
        yield
    finally:
        from megatron_vespo.parallel.state import destroy_parallel

        destroy_parallel(destroy_process_group=True)


@contextlib.contextmanager
def _gather_from_shards(shard_of: dict[int, Shard]) -> Iterator[None]:
    """Make the mapping's object all-gathers return every rank's own answer (see module docstring)."""
    from megatron_vespo.checkpoint import hf_weights

    def gather(obj: Any, group: Any = None) -> list:
        ranks = torch.distributed.get_process_group_ranks(group) if group is not None else sorted(shard_of)
        names = [shard_of[r].names for r in ranks]
        return [sorted(n) if isinstance(obj, list) else set(n) for n in names]

    saved = hf_weights._all_gather_object
    hf_weights._all_gather_object = gather
    try:
        yield
    finally:
        hf_weights._all_gather_object = saved


@contextlib.contextmanager
def _count_collectives(counts: dict[str, int]) -> Iterator[None]:
    """Count the all-gathers / broadcasts the export issues on this rank."""
    saved = {n: getattr(torch.distributed, n) for n in ("all_gather", "broadcast")}

    def wrap(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return saved[name](*args, **kwargs)
        return call

    for n in saved:
        setattr(torch.distributed, n, wrap(n))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.distributed, n, fn)


class _MetaReader:
    """Serves meta tensors of the checkpoint index's shapes and records what was read."""

    def __init__(self, index: dict[str, tuple], dtype: torch.dtype) -> None:
        self.index, self.dtype, self.read = index, dtype, []

    def get(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise KeyError(f"the import asked for '{name}', which the checkpoint index does not hold")
        self.read.append(name)
        return torch.empty(self.index[name], dtype=self.dtype, device="meta")


def _shard_layout(coords: tuple, parallel: Any) -> Any:
    from megatron_vespo.checkpoint.hf_weights import ShardLayout

    tp, pp, ep, etp = coords
    return ShardLayout(tp_rank=tp, tp_size=parallel.tensor_model_parallel_size, etp_rank=etp,
                       etp_size=parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size,
                       ep_rank=ep, ep_size=parallel.expert_model_parallel_size, pp_rank=pp,
                       pp_size=parallel.pipeline_model_parallel_size)


def build_shards(hf_cfg: Any, parallel: Any, world_size: int, *, params_dtype: str = "bfloat16",
                 index: Optional[dict[str, tuple]] = None, bucket_bytes: int = 512 * 2**20,
                 export_dtype: Any = None, **tf_overrides: Any) -> BuildResult:
    """Build every distinct rank's shard on meta and run the export/import mapping on them.

    ``index`` is the checkpoint's ``{name: shape}`` the import reads (default: derived from the
    config, :func:`megatron_vespo.plan.hf_index.hf_checkpoint_index`). ``export_dtype`` is the weight
    sync's export dtype (a float dtype name, or another format ``iter_hf_weights`` accepts, whose
    buckets then come from a second pass while the names and shapes are checked in the model's
    dtype). ``tf_overrides`` are extra
    ``TransformerConfig`` fields (the job's ``model.transformer_overrides``). Needs a process
    without an initialised ``torch.distributed`` (the fake group takes its place).
    """
    from megatron_vespo.checkpoint.hf_weights import as_dims, iter_hf_weights, load_hf_weights, local_params
    from megatron_vespo.compat.cpu import apply_cpu_compat
    from megatron_vespo.models.qwen3_moe import build_gpt_model
    from megatron_vespo.plan.hf_index import hf_checkpoint_index

    if torch.distributed.is_initialized():
        raise RuntimeError("build_shards needs a process without an initialised torch.distributed "
                           "(it joins a fake process group per rank)")
    if torch.cuda.is_available():
        # a GPU login node: the meta build must take the CPU code paths too (no .cuda(), CPU-side
        # initialisation, no CUDA RNG), so the compat layer is forced and CUDA hidden for the build
        from unittest import mock

        apply_cpu_compat(force=True)
        with mock.patch.object(torch.cuda, "is_available", lambda: False):
            return build_shards(hf_cfg, parallel, world_size, params_dtype=params_dtype, index=index,
                                bucket_bytes=bucket_bytes, export_dtype=export_dtype, **tf_overrides)
    apply_cpu_compat()
    t_all = time.perf_counter()
    dims = as_dims(hf_cfg)
    coords = rank_coordinates(parallel, world_size)
    classes: dict[tuple, list[int]] = {}
    for r, c in coords.items():
        classes.setdefault(c, []).append(r)
    models, shards, shard_of = {}, [], {}
    for c, ranks in classes.items():
        t0 = time.perf_counter()
        with fake_rank(parallel, ranks[0], world_size):
            with torch.device("meta"):
                model = build_gpt_model(hf_cfg, parallel, params_dtype=params_dtype, use_te=False,
                                            **{"perform_initialization": False, **tf_overrides})
        sh = Shard(rank=ranks[0], ranks=ranks, tp=c[0], pp=c[1], ep=c[2], etp=c[3])
        for lp in local_params(model, dims, _shard_layout(c, parallel)):
            n = lp.param.numel()
            sh.params += n
            sh.param_bytes += n * lp.param.element_size()
            sh.expert_params += n if lp.rule.expert is not None else 0
            sh.vocab_params += n if lp.rule.vocab else 0
            if lp.param.element_size() == 2:
                sh.half_params += n
                sh.half_expert_params += n if lp.rule.expert is not None else 0
            sh.names.append(lp.rule.mcore)
        sh.layers = [int(layer.layer_number) - 1 for layer in model.decoder.layers]
        sh.build_s = time.perf_counter() - t0
        logger.info("rank %d (tp %d pp %d ep %d etp %d): %d params built on meta in %.1fs", ranks[0], *c,
                    sh.params, sh.build_s)
        models[c] = model
        shards.append(sh)
        for r in ranks:
            shard_of[r] = sh

    # Each canonical parameter once; a TP-split one is numel x its split size.
    full: dict[str, tuple[int, int, bool]] = {}
    for c, model in models.items():
        for lp in local_params(model, dims, _shard_layout(c, parallel)):
            n = lp.param.numel() * (lp.tp_size if lp.rule.tp_dim is not None else 1)
            unpadded = dims.vocab_size * dims.hidden_size if lp.rule.vocab else n
            full[lp.rule.mcore] = (n, unpadded, lp.rule.expert is not None)
    index = index if index is not None else hf_checkpoint_index(hf_cfg)
    reader_dtype = getattr(torch, params_dtype) if isinstance(params_dtype, str) else params_dtype
    export: dict[str, tuple] = {}
    buckets: list[tuple[int, int]] = []
    collectives: dict[str, int] = {}
    imported: set[str] = set()
    reads = 0
    first = shards[0]
    plain = export_dtype is None or str(export_dtype).replace("torch.", "") in ("float32", "bfloat16", "float16")
    with fake_rank(parallel, first.rank, world_size), _gather_from_shards(shard_of):
        model0 = models[(first.tp, first.pp, first.ep, first.etp)]
        with _count_collectives(collectives):
            for bucket in iter_hf_weights(model0, dims, bucket_bytes=bucket_bytes,
                                          dtype=export_dtype if plain else None):
                if plain:
                    buckets.append((len(bucket), sum(t.numel() * t.element_size() for _, t in bucket)))
                for name, t in bucket:
                    if name in export:
                        raise RuntimeError(f"the export produced '{name}' twice")
                    export[name] = tuple(t.shape)
        if not plain:  # e.g. block FP8 for an FP8 engine: extra scale tensors, so buckets from a second pass
            for bucket in iter_hf_weights(model0, dims, bucket_bytes=bucket_bytes, dtype=export_dtype):
                buckets.append((len(bucket), sum(t.numel() * t.element_size() for _, t in bucket)))
        for c, model in models.items():
            reader = _MetaReader(index, reader_dtype)
            load_hf_weights(model, reader, dims, _shard_layout(c, parallel))
            imported.update(reader.read)
            reads += len(reader.read)
    return BuildResult(
        world_size=world_size, shards=shards,
        total_padded=sum(v[0] for v in full.values()), total=sum(v[1] for v in full.values()),
        expert_total=sum(v[0] for v in full.values() if v[2]),
        export=export, export_buckets=buckets, export_collectives=collectives, imported=sorted(imported),
        import_reads=reads, build_s=time.perf_counter() - t_all)
