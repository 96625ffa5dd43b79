"""Scheduler: stagger, fixed rate, skip missed ticks, deadlines, exceptions, diff-apply — on a
fake clock, so nothing here depends on the machine's speed."""

from __future__ import annotations

import asyncio
import itertools

from agent.config.model import Job
from agent.runtime.scheduler import Done, Scheduler, stagger
from agent.runtime.selfstats import SelfStats
from probes.base import ProbeResult, RunHandle, Target
from probes.icmp import IcmpOptions
from tests.helpers import FakeClock


def job(name: str, interval: float = 1.0, **kw: object) -> Job:
    opts = IcmpOptions(interval=interval, packets=1, timeout=min(0.5, interval), **kw)  # type: ignore[arg-type]
    return Job(Target(name, "127.0.0.1"), "icmp", opts)


class Recorder:
    """A runner whose kind has only the async form."""

    bounded = False

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.starts: dict[str, list[float]] = {}
        self.results: list[tuple[str, ProbeResult]] = []
        self.behaviour: dict[str, str] = {}

    def start(self, j: Job, done: Done) -> RunHandle | None:
        return None

    def self_bounded(self, j: Job) -> bool:
        return self.bounded

    async def run(self, j: Job) -> ProbeResult:
        self.starts.setdefault(j.target.name, []).append(self.clock.now())
        b = self.behaviour.get(j.target.name)
        if b == "raise":
            raise RuntimeError("boom")
        if b == "hang":
            await asyncio.Event().wait()
        return ProbeResult(success=True)

    def record(self, j: Job, r: ProbeResult) -> None:
        self.results.append((j.target.name, r))


def make(clock: FakeClock) -> tuple[Scheduler, Recorder]:
    rec = Recorder(clock)
    return Scheduler(rec, stats=SelfStats(), clock=clock), rec


async def test_starts_are_staggered_across_the_interval() -> None:
    clock = FakeClock()
    sched, rec = make(clock)
    start = clock.now()
    sched.apply([job(f"t{i}") for i in range(200)])
    await clock.advance(1.0 + sched.slot)
    offsets = sorted(v[0] - start for v in rec.starts.values())
    assert len(offsets) == 200
    # Spread over the interval, not a burst: every tenth of the interval gets some starts.
    deciles = {min(int(o * 10), 9) for o in offsets}
    assert deciles == set(range(10))
    for name, first in rec.starts.items():
        # The stagger, rounded up to the scheduler's slot grid (ticks of a slot share a timer).
        assert -1e-9 < first[0] - start - stagger((name, "icmp")) < sched.slot + 1e-9
    await sched.stop(0)


async def test_fixed_rate_ticks() -> None:
    clock = FakeClock()
    sched, rec = make(clock)
    sched.apply([job("a", interval=2.0)])
    await clock.advance(10.0)
    t = rec.starts["a"]
    assert len(t) == 5
    assert all(abs((b - a) - 2.0) < 1e-9 for a, b in itertools.pairwise(t))
    await sched.stop(0)


async def test_missed_ticks_are_skipped_not_queued() -> None:
    clock = FakeClock()
    sched, rec = make(clock)
    sched.apply([job("a", interval=1.0)])
    await clock.advance(1.0)
    n = len(rec.starts["a"])
    phase = rec.starts["a"][0] % 1.0
    next_tick = rec.starts["a"][-1] + 1.0
    # The event loop stalls for 3.5 intervals: one late run, not back-to-back catch-up runs.
    await clock.jump(3.5)
    due = int(clock.now() - next_tick) + 1  # ticks that fell inside the stall
    assert due in (3, 4)
    assert len(rec.starts["a"]) == n + 1
    assert sched.stats.skipped_ticks == due - 1
    assert sched.stats.late_ticks >= 1
    await clock.advance(1.0)
    # ...and the series keeps its phase afterwards.
    assert abs(rec.starts["a"][-1] % 1.0 - phase) < 1e-9
    await sched.stop(0)


async def test_deadline_and_exception_are_counted_and_the_loop_goes_on() -> None:
    clock = FakeClock()
    sched, rec = make(clock)
    rec.behaviour = {"boom": "raise"}
    sched.apply([job("boom", interval=1.0), job("ok", interval=1.0)])
    await clock.advance(3.0)
    reasons = [r.reason for n, r in rec.results if n == "boom"]
    assert reasons and set(reasons) == {"exception"}
    assert sched.stats.run_exceptions == len(reasons)
    assert any(n == "ok" and r.success for n, r in rec.results)
    await sched.stop(0)


async def test_hanging_probe_hits_deadline() -> None:
    # The deadline uses the real event-loop timer (asyncio.timeout), so use a short interval.
    clock = FakeClock()
    sched, rec = make(clock)
    rec.behaviour = {"hang": "hang"}
    sched.apply([job("hang", interval=0.05)])
    for _ in range(40):
        await asyncio.sleep(0.01)
        clock.t += 0.01
        await clock.advance(0)
    assert any(r.reason == "deadline" for _, r in rec.results)
    await sched.stop(0)


async def test_apply_diffs_targets() -> None:
    clock = FakeClock()
    sched, rec = make(clock)
    a, b, c = job("a"), job("b"), job("c")
    sched.apply([a, b])
    entry_a = sched.entries[a.key]
    tick_a = entry_a.slot
    added, removed, changed = sched.apply([a, job("b", interval=2.0), c])
    assert [j.target.name for j in added] == ["c"]
    assert removed == []
    assert [j.target.name for j in changed] == ["b"]
    # Unchanged targets keep running untouched: the same entry, its tick still armed.
    assert sched.entries[a.key] is entry_a and entry_a.slot == tick_a is not None
    _, removed, _ = sched.apply([c])
    assert {j.target.name for j in removed} == {"a", "b"}
    assert entry_a.slot is None  # its tick is disarmed
    await clock.advance(2.0)
    assert "a" not in rec.starts and "b" not in rec.starts
    await sched.stop(0)
    assert sched.task_count == 0


async def test_trigger_runs_once_out_of_band() -> None:
    clock = FakeClock()
    sched, rec = make(clock)
    sched.apply([job("p", interval=60.0)])
    await clock.advance(0)
    before = len(rec.starts.get("p", []))
    assert sched.trigger(("p", "icmp"))
    await clock.advance(0)
    assert len(rec.starts["p"]) == before + 1
    assert not sched.trigger(("nope", "icmp"))
    await sched.stop(0)


async def test_self_bounded_kinds_get_no_extra_deadline_timer() -> None:
    class Slow(Recorder):
        async def run(self, j: Job) -> ProbeResult:
            await asyncio.sleep(0.05)
            return ProbeResult(success=True)

    bounded_runner = Slow(FakeClock())
    bounded_runner.bounded = True
    bounded = Scheduler(bounded_runner)
    plain = Scheduler(Slow(FakeClock()))
    r1 = await bounded._run(job("a"), 0.01)
    r2 = await plain._run(job("a"), 0.01)
    assert r1 is not None and r1.success
    assert r2 is not None and r2.reason == "deadline"


class CallbackRecorder(Recorder):
    """A kind with a callback form: ``start`` begins a run now; the test finishes it."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.open: dict[str, list[Done]] = {}
        self.cancelled: list[str] = []
        self.async_runs = 0

    bounded = True

    def start(self, j: Job, done: Done) -> RunHandle | None:
        name = j.target.name
        b = self.behaviour.get(name)
        if b == "needs-task":
            return None
        self.starts.setdefault(name, []).append(self.clock.now())
        if b == "raise":
            raise RuntimeError("boom")
        if b == "instant":
            done(ProbeResult(success=True))
            return None
        rec = self

        class Handle:
            def cancel(self) -> None:
                rec.cancelled.append(name)

        self.open.setdefault(name, []).append(done)
        return Handle()

    async def run(self, j: Job) -> ProbeResult:
        self.async_runs += 1
        return ProbeResult(success=True)

    def finish_all(self) -> None:
        for dones in self.open.values():
            for d in dones:
                d(ProbeResult(success=True))
        self.open.clear()


def make_cb(clock: FakeClock) -> tuple[Scheduler, CallbackRecorder]:
    rec = CallbackRecorder(clock)
    return Scheduler(rec, stats=SelfStats(), clock=clock), rec


async def test_callback_driven_stagger_fixed_rate_and_no_task() -> None:
    clock = FakeClock()
    sched, rec = make_cb(clock)
    rec.behaviour = {f"t{i}": "instant" for i in range(50)}
    start = clock.now()
    before = len(asyncio.all_tasks())
    sched.apply([job(f"t{i}", interval=2.0) for i in range(50)])
    assert len(asyncio.all_tasks()) == before  # timers, not a task per series
    await clock.advance(10.0)
    for name, t in rec.starts.items():
        # The stagger, rounded up to the scheduler's slot grid (ticks of a slot share a timer).
        offset = t[0] - start - stagger((name, "icmp")) * 2.0
        assert -1e-9 < offset < sched.slot + 1e-9
        assert abs(t[0] / sched.slot - round(t[0] / sched.slot)) < 1e-6
        assert len(t) == 5
        assert all(abs((b - a) - 2.0) < 1e-9 for a, b in itertools.pairwise(t))
    assert len(rec.results) == 250
    assert sched.task_count == 50
    assert len(sched._slots) <= 50 and len(sched._slot_timers) == len(sched._slots)
    await sched.stop(0)
    assert sched.task_count == 0


async def test_callback_driven_run_rearms_on_completion_and_skips_missed_ticks() -> None:
    clock = FakeClock()
    sched, rec = make_cb(clock)
    sched.apply([job("a", interval=1.0)])
    await clock.advance(1.0)
    assert len(rec.starts["a"]) == 1
    phase = rec.starts["a"][0] % 1.0
    await clock.advance(3.5)
    assert len(rec.starts["a"]) == 1  # the run is still open: no overlapping run
    rec.finish_all()  # ...it completes 3.5 intervals late
    await clock.advance(0)
    assert len(rec.starts["a"]) == 2  # one late run, not a catch-up burst
    assert sched.stats.skipped_ticks >= 2
    assert sched.stats.late_ticks >= 1
    rec.finish_all()
    await clock.advance(1.0)
    assert abs(rec.starts["a"][-1] % 1.0 - phase) < 1e-9
    assert [n for n, _ in rec.results] == ["a", "a"]
    await sched.stop(0)


async def test_callback_driven_exception_fallback_and_diff() -> None:
    clock = FakeClock()
    sched, rec = make_cb(clock)
    rec.behaviour = {"boom": "raise", "name": "needs-task", "ok": "instant"}
    a = job("ok")
    sched.apply([job("boom"), job("name"), a, job("open")])
    await clock.advance(3.0)
    reasons = [r.reason for n, r in rec.results if n == "boom"]
    assert reasons and set(reasons) == {"exception"}
    assert sched.stats.run_exceptions == len(reasons)
    # A run the callback form cannot take goes through the async form, then back to timers.
    assert rec.async_runs >= 2 and sum(n == "name" for n, _ in rec.results) == rec.async_runs
    assert sum(n == "ok" for n, _ in rec.results) >= 3
    # Diff-apply: the changed series' open run is abandoned (nothing recorded), the
    # unchanged one keeps its entry.
    entry_ok = sched.entries[a.key]
    sched.apply([a, job("open", interval=2.0)])
    assert sched.entries[a.key] is entry_ok
    assert rec.cancelled == ["open"]
    n_open = sum(n == "open" for n, _ in rec.results)
    assert n_open == 0
    await sched.stop(0)


async def test_callback_driven_stop_waits_for_runs_then_abandons() -> None:
    clock = FakeClock()
    sched, rec = make_cb(clock)
    sched.apply([job("a"), job("b")])
    await clock.advance(1.0)
    assert set(rec.open) == {"a", "b"}
    done_a = rec.open.pop("a")[0]
    stopping = asyncio.ensure_future(sched.stop(0.2))
    await asyncio.sleep(0.01)
    done_a(ProbeResult(success=True))  # finishes inside the grace: recorded
    await stopping
    assert [n for n, _ in rec.results] == ["a"]
    assert rec.cancelled == ["b"]  # still open after the grace: abandoned
    assert sched.task_count == 0
    rec.finish_all()  # a late callback records nothing
    assert [n for n, _ in rec.results] == ["a"]


async def test_callback_driven_slot_size_and_odd_intervals() -> None:
    clock = FakeClock()
    sched, rec = make_cb(clock)
    rec.behaviour = {f"t{i}": "instant" for i in range(2000)} | {"odd": "instant"}
    # ~20 runs share a slot: 2,000 runs/s -> 10 ms slots; 20 runs/s -> the largest.
    sched.apply([job(f"t{i}") for i in range(2000)])
    assert sched.slot == 0.01
    sched.apply([job(f"t{i}") for i in range(20)] + [job("odd", interval=0.333)])
    assert sched.slot == max(Scheduler.SLOTS)
    await clock.advance(3.0)
    # Still fixed rate where the interval is no whole number of slots: its own exact timer.
    t = rec.starts["odd"]
    assert len(t) >= 8
    assert all(abs((b - a) - 0.333) < 1e-9 for a, b in itertools.pairwise(t))
    await sched.stop(0)
