"""Dynamic targets: Prometheus ``file_sd`` and ``http_sd`` formats, and DNS SRV records.

Operators keep hundreds of edges in an inventory, not in a hand-edited config. Each source
produces :class:`DiscoveredTarget` lists and calls ``on_change(source_name, targets)`` whenever
its list changes.

An unattended agent must not lose its targets because an inventory file was half-written or an
HTTP endpoint was down: a refresh that fails for any reason keeps the last good list (per file
and per DNS name, so one bad file does not empty the others) and sets
``edgeprobe_sd_last_refresh_successful{source} 0``. To really remove every target of a source,
remove the source or publish an empty list.

Group format (file_sd / http_sd)::

    [{"targets": ["edge-sg-1.example.net", "edge-sg-2.example.net:3478"],
      "labels": {"tier": "near", "__edge__": "sg-2", "__probes__": "icmp,stun"}}]

* a target is ``host`` or ``host:port``; the port is kept for kinds with a ``port`` option;
* the ``edge`` label (the target's name) is ``__edge__`` when a group has exactly one target,
  else the host;
* ``__probes__`` (comma-separated kinds) overrides the source's ``probes``;
* other labels starting with ``__`` are dropped, as Prometheus drops them after relabelling;
  label names edgeprobe sets itself (``region``, ``edge``, ``probe``...) are an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client.core import Metric

from agent.discovery.config import DiscoveryConfig, FileSDConfig, HttpSDConfig
from agent.discovery.dns_sd import DnsSD
from agent.discovery.file_sd import FileSD
from agent.discovery.groups import DiscoveredTarget, SDError, merge_targets
from agent.discovery.http_sd import HttpSD
from agent.discovery.source import Partial, Source
from agent.export import catalog as C

log = logging.getLogger("edgeprobe.discovery")


OnChange = Callable[[str, list[DiscoveredTarget]], None]


class Discovery:
    """Runs every source on its own interval; calls ``on_change`` when a source's list changes.

    ``await start()`` does one refresh of every source before returning, so the agent starts
    with its dynamic targets in place; then each source refreshes in its own task."""

    def __init__(
        self,
        cfg: DiscoveryConfig,
        on_change: OnChange,
        *,
        base_dir: Path = Path("."),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self._wall = wall_clock
        self.sources: list[Source] = []
        for s in cfg.sources():
            if isinstance(s, FileSDConfig):
                self.sources.append(FileSD(s, base_dir))
            elif isinstance(s, HttpSDConfig):
                self.sources.append(HttpSD(s, base_dir))
            else:
                self.sources.append(DnsSD(s))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await asyncio.gather(*(self.refresh(s) for s in self.sources))
        self._tasks = [
            asyncio.create_task(self._loop(s), name=f"sd:{s.state.name}") for s in self.sources
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        for s in self.sources:
            await s.close()

    async def _loop(self, s: Source) -> None:
        while True:
            await asyncio.sleep(s.interval)
            await self.refresh(s)

    async def refresh(self, s: Source) -> None:
        st = s.state
        before = st.targets
        errors: list[SDError]
        try:
            new = await s.refresh()
            errors = []
        except Partial as p:
            new, errors = p.targets, p.errors
        except SDError as e:
            new, errors = before, [e]
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A bug must not stop discovery: keep the last good list and say so.
            log.exception("target source refresh crashed", extra={"source": st.name})
            new, errors = before, [SDError("invalid", type(e).__name__)]
        for err in errors:
            st.failures[err.reason] += 1
        if errors:
            msg = "; ".join(str(err) for err in errors)[:1000]
            if not st.successful or msg != st.last_error:
                log.warning(
                    "target source refresh failed, keeping the last good targets",
                    extra={"source": st.name, "kind": st.kind, "error": msg},
                )
            st.successful = False
            st.last_error = msg
        else:
            st.successful = True
            st.last_error = ""
            st.last_success_time = self._wall()
        if new != before:
            st.targets = new
            self.on_change(st.name, list(new))

    def targets(self) -> list[DiscoveredTarget]:
        """All sources' targets; a name already taken by an earlier source is skipped."""
        return merge_targets(s.state.targets for s in self.sources)

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        ok, n, ts, fails = (
            C.metric_family(f) for f in (C.SD_OK, C.SD_TARGETS, C.SD_SUCCESS_TIME, C.SD_FAILURES)
        )
        for s in self.sources:
            st = s.state
            ok.add_metric([st.name], 1.0 if st.successful else 0.0)
            n.add_metric([st.name], float(len(st.targets)))
            ts.add_metric([st.name], st.last_success_time)
            for reason, count in st.failures.items():
                fails.add_metric([st.name, reason], count)
        yield from (ok, n, ts, fails)
