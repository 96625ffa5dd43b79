"""Test helpers that live beside the code: a fake clock for the scheduler, config builders."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any


class _FakeTimer:
    __slots__ = ("args", "cancelled", "fn")

    def __init__(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A manually advanced clock. ``sleep_until`` parks the caller until ``advance`` passes
    its time, and ``call_at`` callbacks run when it passes theirs; both in time order."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None] | _FakeTimer]] = []
        self._n = itertools.count()

    def call_at(self, when: float, fn: Callable[..., None], *args: Any) -> _FakeTimer:
        h = _FakeTimer(fn, args)
        heapq.heappush(self._sleepers, (when, next(self._n), h))
        return h

    def now(self) -> float:
        return self.t

    async def sleep_until(self, when: float) -> None:
        if when <= self.t:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when, next(self._n), fut))
        await fut

    async def advance(self, dt: float, step: float | None = None) -> None:
        """Move time forward by ``dt``, waking sleepers in order and letting them run."""
        end = self.t + dt
        while True:
            await _settle()
            if not self._sleepers or self._sleepers[0][0] > end:
                break
            when, _, fut = heapq.heappop(self._sleepers)
            self.t = max(self.t, when)
            if isinstance(fut, _FakeTimer):
                if not fut.cancelled:
                    fut.fn(*fut.args)
            elif not fut.done():
                fut.set_result(None)
        self.t = end
        await _settle()

    async def jump(self, dt: float) -> None:
        """Move time forward without waking anyone in between (a stalled event loop)."""
        self.t += dt
        await self.advance(0)


async def _settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


@contextlib.contextmanager
def netns(prefix: str = "eptest") -> Iterator[str]:
    """A fresh network namespace with only ``lo`` up (root only); removed on exit, always.
    Nothing in it can reach any real network."""
    name = f"{prefix}{os.getpid()}x{next(_ns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", name, *cmd]


def can_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


_ns_counter = itertools.count()
