"""What the loop, the weight sync and the evaluator need from the rollout side, as protocols.

Two boundaries cross packages here, and typing them (rather than ``Any``) tells a reader what
a stand-in must provide:

* :class:`Router`: the engines behind one API (:class:`~megatron_vespo.rollout.router.EngineRouter`):
  batched generation, a call broadcast to every client, the weight-update and pause calls the
  loop makes, and the seed / round-robin counters a checkpoint saves.
* :class:`Engines`: running engines with their router and the event loop that talks to them
  (``orchestration.engines.RolloutEngines``, built on rank 0 only). ``weight_sync/`` and
  ``evaluation/`` take it without importing ``orchestration/`` (which sits above them).

Both are ``runtime_checkable`` (``isinstance`` checks the members exist);
``tests/test_interfaces.py`` checks the real classes against them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.config import SamplingConfig
    from megatron_vespo.types import Sample


@runtime_checkable
class Router(Protocol):
    """Several engines behind one API (``rollout/router.py`` is the implementation)."""

    clients: list["SGLangClient"]

    @property
    def urls(self) -> list[str]:
        """Engine URLs in order."""
        ...

    async def generate(self, prompt_tokens: Sequence[int], sampling: "SamplingConfig | Mapping[str, Any]",
                       **kwargs: Any) -> "Sample":
        """One response from the engine the routing policy picks."""
        ...

    async def generate_groups(self, prompts: Sequence[Sequence[int]], sampling: "SamplingConfig | Mapping[str, Any]",
                              n_samples_per_prompt: int, *, first_group: int = 0,
                              metadata: Optional[Sequence[Mapping[str, Any]]] = None,
                              batched: bool = True) -> list["Sample"]:
        """``n_samples_per_prompt`` samples per prompt, prompt-major; group ``first_group + g`` = prompt g."""
        ...

    async def broadcast(self, fn: Callable[["SGLangClient"], Awaitable[Any]]) -> list[Any]:
        """``fn(client)`` on every engine at once; the answers in engine order."""
        ...

    async def update_weights_from_disk(self, model_path: str, policy_version: int, **kwargs: Any) -> list[dict]:
        """Every engine loads ``model_path`` tagged ``policy_version``."""
        ...

    async def pause_generation(self, mode: str = "abort") -> None:
        """Pause every engine (``abort``, ``retract`` or ``in_place``)."""
        ...

    async def continue_generation(self) -> None:
        """Resume every engine after ``pause_generation``."""
        ...

    def state_dict(self) -> dict[str, int]:
        """The seed and round-robin counters (saved in training checkpoints)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the counters of ``state_dict``."""
        ...


@runtime_checkable
class Engines(Protocol):
    """Running engines, their router and the event loop the calls run on (rank 0 only)."""

    router: Optional[Router]
    loop: asyncio.AbstractEventLoop

    def run(self, awaitable: Awaitable[Any]) -> Any:
        """Run a coroutine on the engines' event loop and return its result."""
        ...

    def stop(self) -> None:
        """Stop the engines this object started; close the clients and the loop."""
        ...
