"""The weight-update endpoints of an SGLang engine, as a mixin of :class:`~megatron_vespo.rollout.client.SGLangClient`.

Disk reloads (``/update_weights_from_disk``), retagging (``/update_weight_version``), the
trainer's broadcast group (``/init_weights_update_group``, ``/update_weights_from_distributed``,
``/destroy_weights_update_group``), colocated tensor updates (``/update_weights_from_tensor``)
and sglang >= 0.5.21's update windows (``/begin_weight_update``, ``/end_weight_update``). Bodies
follow sglang 0.5.23 ``entrypoints/http_server.py``; ``weight_sync/`` drives them. The client
supplies the transport (``request``), ``url``, ``server_info`` and ``policy_version`` (the
version the engine was last told).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Optional

from megatron_vespo.rollout.errors import EngineHTTPError, RolloutEngineError

logger = logging.getLogger(__name__)

# sglang 0.5.21 added /begin_weight_update and /end_weight_update; from then on the scheduler
# refuses update_weights_from_distributed / _from_tensor outside such a window
# (sglang 0.5.21-0.5.23 managers/scheduler_components/weight_updater.py).
WEIGHT_WINDOW_MIN_VERSION = (0, 5, 21)


def parse_version(text: Any) -> Optional[tuple[int, int, int]]:
    """``"0.5.23"`` / ``"v0.5.21.post1"`` -> ``(0, 5, 23)``; None when ``text`` starts with no version."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text or ""))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


class WeightUpdateEndpoints:
    """Weight-update calls of one engine; mixed into ``SGLangClient``, which provides ``request``."""

    url: str
    policy_version: int

    async def request(self, method: str, path: str, json: Any = None, retry: bool = True) -> Any:
        """Provided by the client (one HTTP request, parsed answer)."""
        raise NotImplementedError

    async def server_info(self) -> dict:
        """Provided by the client (``/server_info``)."""
        raise NotImplementedError

    async def update_weights_from_disk(self, model_path: str, policy_version: int, *,
                                       load_format: Optional[str] = None, abort_all_requests: bool = False,
                                       flush_cache: bool = True) -> dict:
        """Load new weights from an HF checkpoint directory and tag them ``policy_version``."""
        body = {"model_path": str(model_path), "abort_all_requests": abort_all_requests, "flush_cache": flush_cache}
        return await self._post_update("/update_weights_from_disk", body, int(policy_version), load_format)

    async def _post_update(self, path: str, body: dict[str, Any], policy_version: Optional[int],
                           load_format: Optional[str]) -> dict:
        """POST a weight update (no retry: it is not idempotent); raise unless the engine reports
        success; a given ``policy_version`` becomes the engine's weight version (and ours)."""
        if policy_version is not None:
            body["weight_version"] = str(int(policy_version))
        if load_format is not None:
            body["load_format"] = load_format
        result = await self.request("POST", path, json=body, retry=False)
        if not result.get("success", False):
            raise RolloutEngineError(f"{self.url}{path} failed: {result.get('message')}")
        if policy_version is not None:
            self.policy_version = int(policy_version)
        return result

    async def update_weight_version(self, policy_version: int, abort_all_requests: bool = False) -> None:
        """Retag the current weights (``/update_weight_version``), e.g. after a tensor/NCCL update."""
        await self.request("POST", "/update_weight_version", json={
            "new_version": str(int(policy_version)), "abort_all_requests": abort_all_requests})
        self.policy_version = int(policy_version)

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str = "weight_update_group",
                                        backend: str = "nccl") -> dict:
        """Join the trainer's weight-broadcast process group (``/init_weights_update_group``)."""
        return await self.request("POST", "/init_weights_update_group", retry=False, json={
            "master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend})

    async def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                              policy_version: Optional[int], group_name: str = "weight_update_group",
                                              flush_cache: bool = True, load_format: Optional[str] = None) -> dict:
        """Receive one bucket of tensors broadcast by the trainer (``/update_weights_from_distributed``).

        ``policy_version=None`` leaves the engine's weight version unchanged (buckets before the
        last one of a sync); ``load_format="flattened_bucket"``: the bucket comes as one flat
        uint8 broadcast. sglang >= 0.5.21 refuses it outside ``begin_weight_update`` /
        ``end_weight_update`` (see ``weight_update_window``).
        """
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                "flush_cache": flush_cache}
        return await self._post_update("/update_weights_from_distributed", body, policy_version, load_format)

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict:
        """Leave the weight-broadcast group (``/destroy_weights_update_group``)."""
        return await self.request("POST", "/destroy_weights_update_group", retry=False,
                                  json={"group_name": group_name})

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], policy_version: Optional[int], *,
                                         load_format: Optional[str] = None, flush_cache: bool = True) -> dict:
        """Colocated update (``/update_weights_from_tensor``); tensors serialized by SGLang's
        ``MultiprocessingSerializer`` and base64-encoded by the caller (one string per engine TP
        rank). ``policy_version=None`` leaves the engine's weight version unchanged. Needs an open
        ``weight_update_window`` on sglang >= 0.5.21."""
        body = {"serialized_named_tensors": serialized_named_tensors, "flush_cache": flush_cache}
        return await self._post_update("/update_weights_from_tensor", body, policy_version, load_format)

    async def begin_weight_update(self, selector: str = "all") -> bool:
        """Open the engine's weight-update window (``/begin_weight_update``, sglang >= 0.5.21).

        Returns True when a window was opened, False on servers without windows (detected once
        from ``/server_info``'s ``version``; a server without a version is probed: 404 = none).
        A window left open by an earlier, interrupted sync is closed and opened again.
        """
        known = getattr(self, "_weight_window", None)
        if known is False:
            return False
        if known is None:
            version = parse_version((await self.server_info()).get("version"))
            if version is not None and version < WEIGHT_WINDOW_MIN_VERSION:
                self._weight_window = False
                return False
        for attempt in range(2):
            try:
                await self.request("POST", "/begin_weight_update", json={"selector": selector}, retry=False)
            except EngineHTTPError as exc:
                if exc.status_code in (404, 405) and known is None:
                    logger.info("%s has no /begin_weight_update (sglang < 0.5.21): no update window", self.url)
                    self._weight_window = False
                    return False
                if attempt == 0 and exc.status_code == 400 and "already open" in exc.body:
                    logger.warning("%s: a weight-update window was left open (interrupted sync?); closing it",
                                   self.url)
                    await self.end_weight_update()
                    continue
                raise RolloutEngineError(f"{self.url}/begin_weight_update failed: {exc}") from exc
            break
        self._weight_window = True
        return True

    async def end_weight_update(self) -> None:
        """Close the window ``begin_weight_update`` opened (``/end_weight_update``)."""
        try:
            await self.request("POST", "/end_weight_update", json={}, retry=False)
        except EngineHTTPError as exc:
            raise RolloutEngineError(f"{self.url}/end_weight_update failed: {exc}") from exc

    @contextlib.asynccontextmanager
    async def weight_update_window(self, selector: str = "all") -> Any:
        """``async with client.weight_update_window():`` around ``update_weights_from_distributed`` /
        ``update_weights_from_tensor`` calls; a no-op on servers without windows. The window is
        closed on the way out, also after an error (a close error then is only logged)."""
        opened = await self.begin_weight_update(selector)
        try:
            yield opened
        except BaseException:
            if opened:
                try:
                    await self.end_weight_update()
                except Exception as exc:  # noqa: BLE001 - the body's error is the one to report
                    logger.warning("closing the weight-update window of %s failed: %s", self.url, exc)
            raise
        if opened:
            await self.end_weight_update()
