"""One driver for every (target, probe kind) series: staggered start, fixed-rate ticks, missed
ticks skipped (never queued), a deadline per run, and targets added/removed/changed by diffing.

Ticks are timer callbacks on a grid of slots, the ticks of one slot sharing one timer, and a
run's completion callback arms the series' next tick: no task per series that sleeps, awaits
and wakes up for every run. A run starts in the kind's callback form when it has one (no task
at all); otherwise, or when that form declines (e.g. a name to look up first), as a task that
awaits the kind's ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from agent.config.model import Job
from agent.runtime.selfstats import SelfStats
from probes.base import ProbeResult, RunAbandoned, RunHandle

log = logging.getLogger("edgeprobe.scheduler")

Done = Callable[[ProbeResult | None], None]


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...
    def call_at(self, when: float, fn: Callable[[float], None], arg: float) -> Timer: ...


class Runner(Protocol):
    """How the scheduler runs a job and where the results go."""

    def start(self, job: Job, done: Done) -> RunHandle | None:
        """Start a run of ``job`` now; its result goes to ``done`` (see probes.base.StartFn).
        None when this run needs ``run`` instead."""
        ...

    async def run(self, job: Job) -> ProbeResult: ...

    def self_bounded(self, job: Job) -> bool:
        """Whether ``run`` ends by itself in time, so the scheduler arms no deadline of its
        own (see ProbeKind.self_bounded)."""
        ...

    def record(self, job: Job, result: ProbeResult) -> None: ...


class LoopClock:
    """The event loop's monotonic clock. The loop is looked up once: ``get_running_loop``
    makes a getpid() system call on every call."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self.loop().time()

    def call_at(self, when: float, fn: Callable[[float], None], arg: float) -> Timer:
        return self.loop().call_at(when, fn, arg)


def stagger(key: tuple[str, str]) -> float:
    """A stable fraction in [0, 1) per series, so runs spread over the interval and keep their
    phase across reloads (a reload must not make every target fire at once)."""
    return zlib.crc32("\x00".join(key).encode()) / 2**32


class _Entry:
    __slots__ = (
        "done",
        "extra",
        "handle",
        "in_run",
        "job",
        "running",
        "runs",
        "slot",
        "task",
        "tick",
    )

    def __init__(self, job: Job) -> None:
        self.job = job
        self.in_run = False  # a run (of a tick or triggered) is in flight
        self.runs = 0
        self.extra: asyncio.Task[None] | None = None  # a triggered out-of-band run
        self.slot: float | None = None  # when the timer of its next tick fires
        self.tick = 0.0  # its scheduled time
        self.running = False  # the run of a tick is in flight...
        self.handle: RunHandle | None = None  # ...in callback form, and how to abandon it
        self.task: asyncio.Task[None] | None = None  # ...or as a task
        self.done: Done | None = None


@dataclass
class Scheduler:
    runner: Runner
    stats: SelfStats = field(default_factory=SelfStats)
    clock: Clock = field(default_factory=LoopClock)
    late_threshold: float = 0.005
    entries: dict[tuple[str, str], _Entry] = field(default_factory=dict)
    stopping: bool = False
    # Ticks are on a grid of ``slot`` seconds, and the ticks of one slot share one timer,
    # because a wake-up per run is a large share of a run's CPU. The slot is chosen on
    # apply() so that about RUNS_PER_SLOT runs share one (a larger burst would make the last
    # runs of a slot late).
    slot: float = 0.02
    _running: int = 0
    _drained: asyncio.Future[None] | None = None
    _slots: dict[float, list[_Entry]] = field(default_factory=dict)
    _slot_timers: dict[float, Timer] = field(default_factory=dict)

    SLOTS = (0.001, 0.002, 0.005, 0.01, 0.02)
    RUNS_PER_SLOT = 20

    def apply(self, jobs: Iterable[Job]) -> tuple[list[Job], list[Job], list[Job]]:
        """Bring the running tasks in line with ``jobs``: (added, removed, changed)."""
        wanted = {j.key: j for j in jobs}
        rate = sum(1.0 / j.options.interval for j in wanted.values())
        self.slot = next(
            (s for s in reversed(self.SLOTS) if rate * s <= self.RUNS_PER_SLOT), self.SLOTS[0]
        )
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
        if self.stopping:
            return
        # The stagger, rounded up to the slot grid (intervals that are whole slots keep every
        # later tick on it).
        first = self.clock.now() + stagger(job.key) * job.options.interval
        e.tick = math.ceil(first / self.slot - 1e-6) * self.slot
        e.done = lambda result: self._done(e, result)
        self._arm(e)

    def _cancel(self, e: _Entry) -> None:
        # An abandoned run records nothing: a packet in flight is neither sent nor lost.
        e.slot = None  # a queued tick is skipped when its slot fires
        self._abandon(e)
        for t in (e.task, e.extra):
            if t is not None:
                t.cancel()

    def _abandon(self, e: _Entry) -> None:
        if not e.running:
            return
        e.running = e.in_run = False
        self._running -= 1
        if e.handle is not None:
            e.handle.cancel()
            e.handle = None
        if e.task is not None:
            e.task.cancel()

    # ------------------------------------------------------------------------- ticks
    def _arm(self, e: _Entry) -> None:
        q = e.tick / self.slot
        idx = round(q)
        if abs(q - idx) > 1e-6:
            per = e.job.options.interval / self.slot
            if abs(per - round(per)) < 1e-6:
                # Off the grid (the slot changed on a reload): onto it, once, < 1 slot later.
                idx = math.ceil(q)
                e.tick = idx * self.slot
            else:
                idx = -1  # an interval of no whole slots: a timer at its own exact time
        when = idx * self.slot if idx >= 0 else e.tick
        e.slot = when
        queued = self._slots.get(when)
        if queued is None:
            self._slots[when] = [e]
            self._slot_timers[when] = self.clock.call_at(when, self._fire_slot, when)
        else:
            queued.append(e)

    def _fire_slot(self, when: float) -> None:
        self._slot_timers.pop(when, None)
        for e in self._slots.pop(when, ()):
            if e.slot == when:
                self._fire(e)

    def _account_tick(self, tick: float, interval: float, now: float) -> float:
        """Count a tick's lateness, skip (and count) the ticks missed entirely; returns the
        tick this run belongs to."""
        late = now - tick
        if late >= interval:
            missed = int(late // interval)
            self.stats.skipped_ticks += missed
            tick += missed * interval
            late = now - tick
        self.stats.lateness.observe(max(late, 0.0))
        if late > self.late_threshold:
            self.stats.late_ticks += 1
        return tick

    def _fire(self, e: _Entry) -> None:
        """A tick: account for its lateness, then start the run; ``_done`` arms the next tick
        when the run completes."""
        e.slot = None
        if self.stopping:
            return
        job = e.job
        interval = job.options.interval
        now = self.clock.now()
        tick = e.tick = self._account_tick(e.tick, interval, now)
        e.in_run = e.running = True
        self._running += 1
        assert e.done is not None
        try:
            handle = self.runner.start(job, e.done)
        except Exception:
            self.stats.run_exceptions += 1
            log.exception("probe raised", extra={"edge": job.target.name, "probe": job.kind})
            self._done(e, ProbeResult.failure("exception", 0.0))
            return
        if not e.running:
            return  # completed synchronously (e.g. the send failed)
        if handle is not None:
            e.handle = handle
            return
        # This run needs the kind's async form (it has no other, or a name to look up first).
        # It must be over before the next tick; kinds finish earlier by themselves
        # (validated: run_time <= interval), so this deadline is only a safety net.
        e.task = asyncio.get_running_loop().create_task(
            self._run_task(e, tick + interval - now), name=f"probe:{job.key}"
        )

    async def _run_task(self, e: _Entry, budget: float) -> None:
        result = await self._run(e.job, budget)
        if e.done is not None:
            e.done(result)

    def _done(self, e: _Entry, result: ProbeResult | None) -> None:
        if not e.running:
            return  # abandoned
        e.running = e.in_run = False
        e.handle = None
        self._running -= 1
        if result is not None:
            e.runs += 1
            try:
                self.runner.record(e.job, result)
            except Exception:
                log.exception(
                    "recording a result failed",
                    extra={"edge": e.job.target.name, "probe": e.job.kind},
                )
        if self.stopping:
            if self._running == 0 and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            return
        e.tick += e.job.options.interval
        self._arm(e)

    async def _run(self, job: Job, budget: float) -> ProbeResult | None:
        t0 = time.monotonic()
        try:
            if self.runner.self_bounded(job):
                # The kind enforces its own deadline (e.g. the ICMP engine's timer): a second
                # timer per run here would only cost CPU.
                return await self.runner.run(job)
            async with asyncio.timeout(budget):
                return await self.runner.run(job)
        except TimeoutError:
            return ProbeResult.failure("deadline", time.monotonic() - t0)
        except asyncio.CancelledError:
            raise
        except RunAbandoned:
            return None
        except Exception:
            self.stats.run_exceptions += 1
            log.exception("probe raised", extra={"edge": job.target.name, "probe": job.kind})
            return ProbeResult.failure("exception", time.monotonic() - t0)

    def trigger(self, key: tuple[str, str]) -> bool:
        """Run ``key`` once now, outside its fixed-rate ticks (e.g. a kind that reports while
        its target fails). Ignored while that series is already running."""
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
                self.runner.record(e.job, result)

        e.extra = asyncio.get_running_loop().create_task(once(), name=f"trigger:{key}")
        return True

    async def stop(self, grace: float = 3.0) -> None:
        """Start no new runs; let runs in flight finish within ``grace``, then abandon them."""
        self.stopping = True
        for h in self._slot_timers.values():
            h.cancel()
        self._slot_timers.clear()
        self._slots.clear()
        tasks: list[asyncio.Future[None]] = []
        for e in self.entries.values():
            e.slot = None
            if e.extra is not None and not e.extra.done():
                tasks.append(e.extra)
        if self._running:  # runs of ticks: waited for through _drained
            self._drained = asyncio.get_running_loop().create_future()
            tasks.append(self._drained)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for e in self.entries.values():
                self._abandon(e)  # runs still in flight after the grace: nothing recorded
            for t in pending:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
        run_tasks = [
            e.task for e in self.entries.values() if e.task is not None and not e.task.done()
        ]
        if run_tasks:
            await asyncio.gather(*run_tasks, return_exceptions=True)

    @property
    def task_count(self) -> int:
        """Series with a live driver: an armed tick, or a run in flight."""
        return sum(
            1
            for e in self.entries.values()
            if (e.task is not None and not e.task.done()) or e.slot is not None or e.running
        )


async def loop_lag_monitor(stats: SelfStats, period: float = 0.25) -> None:
    """Observe how late a periodic timer fires: the event loop's own lag."""
    loop = asyncio.get_running_loop()
    while True:
        want = loop.time() + period
        await asyncio.sleep(period)
        stats.loop_lag.observe(max(0.0, loop.time() - want))
