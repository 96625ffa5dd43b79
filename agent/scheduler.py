"""One task per (target, probe kind): staggered start, fixed-rate ticks, missed ticks skipped
(never queued), a deadline per run, and targets added/removed/changed by diffing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from agent.collector import SelfStats
from agent.config import Job
from probes.base import ProbeResult

log = logging.getLogger("edgeprobe.scheduler")


class Clock(Protocol):
    def now(self) -> float: ...
    async def sleep_until(self, when: float) -> None: ...


class LoopClock:
    """The event loop's monotonic clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, when: float) -> None:
        delay = when - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


def stagger(key: tuple[str, str]) -> float:
    """A stable fraction in [0, 1) per series, so runs spread over the interval and keep their
    phase across reloads (a reload must not make every target fire at once)."""
    return zlib.crc32("\x00".join(key).encode()) / 2**32


ProbeCall = Callable[[Job], Awaitable[ProbeResult]]
Record = Callable[[Job, ProbeResult], None]


@dataclass
class _Entry:
    job: Job
    task: asyncio.Task[None] | None = None
    in_run: bool = False
    runs: int = 0
    extra: asyncio.Task[None] | None = None   # a triggered out-of-band run


@dataclass
class Scheduler:
    call: ProbeCall
    record: Record
    stats: SelfStats = field(default_factory=SelfStats)
    clock: Clock = field(default_factory=LoopClock)
    late_threshold: float = 0.005
    self_bounded: Callable[[Job], bool] = lambda _job: False
    entries: dict[tuple[str, str], _Entry] = field(default_factory=dict)
    stopping: bool = False

    def apply(self, jobs: Iterable[Job]) -> tuple[list[Job], list[Job], list[Job]]:
        """Bring the running tasks in line with ``jobs``: (added, removed, changed)."""
        wanted = {j.key: j for j in jobs}
        added: list[Job] = []
        removed: list[Job] = []
        changed: list[Job] = []
        for key in list(self.entries):
            if key not in wanted:
                e = self.entries.pop(key)
                removed.append(e.job)
                self._cancel(e)
        for key, job in wanted.items():
            cur = self.entries.get(key)
            if cur is None:
                added.append(job)
                self._start(key, job)
            elif cur.job != job:
                changed.append(job)
                self._cancel(cur)
                self._start(key, job)
        return added, removed, changed

    def _start(self, key: tuple[str, str], job: Job) -> None:
        e = _Entry(job)
        self.entries[key] = e
        if not self.stopping:
            e.task = asyncio.get_running_loop().create_task(self._loop(e), name=f"probe:{key}")

    @staticmethod
    def _cancel(e: _Entry) -> None:
        # An abandoned run records nothing: a packet in flight is neither sent nor lost.
        for t in (e.task, e.extra):
            if t is not None:
                t.cancel()

    async def _loop(self, e: _Entry) -> None:
        job = e.job
        interval = job.options.interval
        tick = self.clock.now() + stagger(job.key) * interval
        while not self.stopping:
            await self.clock.sleep_until(tick)
            if self.stopping:
                return
            now = self.clock.now()
            late = now - tick
            if late >= interval:
                missed = int(late // interval)
                self.stats.skipped_ticks += missed
                tick += missed * interval
                late = now - tick
            self.stats.lateness.observe(max(late, 0.0))
            if late > self.late_threshold:
                self.stats.late_ticks += 1
            # The run must be over before the next tick; probes finish earlier by themselves
            # (validated: run_time <= interval), so the deadline is only a safety net.
            deadline = tick + interval
            e.in_run = True
            try:
                result = await self._run(job, deadline - now)
            finally:
                e.in_run = False
            if result is not None:
                e.runs += 1
                self.record(job, result)
            elif self.stopping:
                return
            tick += interval

    async def _run(self, job: Job, budget: float) -> ProbeResult | None:
        t0 = time.monotonic()
        try:
            if self.self_bounded(job):
                # The kind enforces its own deadline (e.g. the ICMP engine's timer); a second
                # timer per run here was measurable CPU at thousands of targets.
                return await self.call(job)
            async with asyncio.timeout(budget):
                return await self.call(job)
        except TimeoutError:
            return ProbeResult.failure("deadline", time.monotonic() - t0)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.run_exceptions += 1
            log.exception("probe raised", extra={"edge": job.target.name, "probe": job.kind})
            return ProbeResult.failure("exception", time.monotonic() - t0)

    def trigger(self, key: tuple[str, str]) -> bool:
        """Run ``key`` once now, outside its fixed-rate ticks (e.g. the path probe right after an
        edge's budget check starts failing). Ignored while that series is already running."""
        e = self.entries.get(key)
        if e is None or e.in_run or self.stopping:
            return False
        e.in_run = True

        async def once() -> None:
            try:
                result = await self._run(e.job, e.job.options.run_time() + 1.0)
            finally:
                e.in_run = False
            if result is not None and self.entries.get(key) is e:
                self.record(e.job, result)

        e.extra = asyncio.get_running_loop().create_task(once(), name=f"trigger:{key}")
        return True

    async def stop(self, grace: float = 3.0) -> None:
        """Start no new runs; let runs in flight finish within ``grace``, then abandon them."""
        self.stopping = True
        tasks = []
        for e in self.entries.values():
            if e.extra is not None and not e.extra.done():
                tasks.append(e.extra)
            if e.task is None:
                continue
            if not e.in_run:
                e.task.cancel()
            tasks.append(e.task)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def task_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.task is not None and not e.task.done())


async def loop_lag_monitor(stats: SelfStats, period: float = 0.25) -> None:
    """Observe how late a periodic timer fires: the event loop's own lag."""
    loop = asyncio.get_running_loop()
    while True:
        want = loop.time() + period
        await asyncio.sleep(period)
        stats.loop_lag.observe(max(0.0, loop.time() - want))
