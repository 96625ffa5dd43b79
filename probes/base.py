"""Types shared by every probe kind: the contract between the scheduler and a probe.

A probe is ``async def run(target, opts, ctx) -> ProbeResult``. It never raises for a network
outcome; it maps the outcome to a bounded ``reason`` declared in its ``ProbeKind``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import Field, dataclass, field
from typing import Any, Generic, Literal, Protocol, Self, TypeVar, cast

IpFamily = Literal["auto", "ipv4", "ipv6"]

# Field metadata key marking a config field whose value is a credential.
SECRET = "secret"


def secret_field(default: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A config field holding a credential (or where one is to be found): its value never
    appears in a repr, a config error or a log line. The config decoder reads the mark.
    ``factory`` makes the default, for a field holding several (a map of users to hashes)."""
    if factory is not None:
        return field(default_factory=factory, repr=False, metadata={SECRET: True})
    return field(default=default, repr=False, metadata={SECRET: True})


def is_secret(f: Field[Any]) -> bool:
    return bool(f.metadata.get(SECRET))


# DSCP code points operators mark media with (RFC 4594): EF for voice/interactive, AF41 for video.
DSCP_CODEPOINTS: dict[str, int] = {
    "": 0,
    "BE": 0,
    "CS0": 0,
    "EF": 46,
    "AF41": 34,
    "AF42": 36,
    "AF43": 38,
    "CS4": 32,
    "CS5": 40,
}


@dataclass(frozen=True)
class CommonOptions:
    """Options every probe kind has. Kinds subclass this and add their own fields."""

    interval: float = 1.0  # seconds between runs
    timeout: float = 1.0  # seconds a single packet/exchange may take
    packets: int = 1  # packets (or exchanges) per run
    spacing: float = 0.02  # seconds between packets of one run
    payload_size: int = 56  # bytes of payload where the kind sends a payload
    ip_family: IpFamily = "auto"
    source_address: str = ""  # bind to this local address ("" = kernel's choice)
    dscp: str = ""  # "", "EF", "AF41", ... (see DSCP_CODEPOINTS)

    def run_time(self) -> float:
        """Worst-case seconds one run takes: the last packet's send time plus its timeout."""
        return (self.packets - 1) * self.spacing + self.timeout

    def validate(self) -> list[str]:
        """Problems with these options, each as 'key: message'. Empty when valid."""
        errs: list[str] = []
        if self.interval <= 0:
            errs.append("interval: must be > 0")
        if self.timeout <= 0:
            errs.append("timeout: must be > 0")
        if self.packets < 1:
            errs.append("packets: must be >= 1")
        if self.packets > 1000:
            errs.append("packets: must be <= 1000")
        if self.spacing < 0:
            errs.append("spacing: must be >= 0")
        if not 0 <= self.payload_size <= 65000:
            errs.append("payload_size: must be between 0 and 65000")
        if self.dscp.upper() not in DSCP_CODEPOINTS:
            errs.append(
                f"dscp: unknown code point {self.dscp!r}; one of "
                + ", ".join(sorted(k for k in DSCP_CODEPOINTS if k))
            )
        if self.interval > 0 and self.run_time() > self.interval:
            errs.append(
                f"interval: a run takes up to {self.run_time():g}s "
                f"((packets-1)*spacing + timeout) which does not fit in the interval of "
                f"{self.interval:g}s"
            )
        return errs

    @property
    def tos(self) -> int:
        """The IP TOS / traffic class byte for ``dscp``."""
        return DSCP_CODEPOINTS[self.dscp.upper()] << 2


@dataclass(frozen=True)
class Target:
    """One edge node as a probe sees it."""

    name: str  # becomes the `edge` label
    address: str  # IP literal or hostname, as configured
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class HopResult:
    """One hop of a path probe. ``index`` is 1-based TTL; ``address`` is never a label."""

    index: int
    rtts: list[float | None]
    address: str = ""


@dataclass
class ProbeResult:
    success: bool
    reason: str = "ok"
    duration: float = 0.0
    rtts: list[float | None] = field(default_factory=list)
    # Protocol sequence numbers of the packets in ``rtts`` (same order), so tests and the
    # one-shot CLI can match each packet with the lab's ground truth. Not exported.
    packet_ids: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    hops: list[HopResult] | None = None

    @classmethod
    def failure(cls, reason: str, duration: float = 0.0, **kw: Any) -> ProbeResult:
        return cls(success=False, reason=reason, duration=duration, **kw)


class Counters(Protocol):
    """Agent-wide counters a probe may bump for packets that belong to no run."""

    def stray(self, probe: str, reason: str, n: int = 1) -> None: ...


class NullCounters:
    def stray(self, probe: str, reason: str, n: int = 1) -> None:
        return None


class Resource(Protocol):
    """Something several runs share, such as a socket per address family or a name cache.

    A kind names the resource types it uses in ``ProbeKind.needs``; the agent creates one of
    each for all the registered kinds that need it, and keeps it in ``ProbeContext.resources``.
    """

    @classmethod
    def create(cls, counters: Counters) -> Self:
        """A new, idle resource (opening sockets waits for ``open`` or first use)."""
        ...

    def configure(self, settings: Any, targets: Collection[str]) -> None:
        """Apply the agent's settings (the config's ``agent`` section), at start and on every
        reload; ``targets`` are the addresses configured now, so per-target state of others
        can go."""
        ...

    def open(self) -> None:
        """Acquire now what start-up should report on (e.g. the sockets and their mode);
        called at agent start when a configured kind needs this resource."""
        ...

    def info(self) -> Mapping[str, str]:
        """Facts about the resource for the agent's build-info metric and start-up log."""
        ...

    def close(self) -> None: ...


R = TypeVar("R", bound=Resource)


class Resources:
    """The shared resources of one agent, at most one of each type."""

    def __init__(self, counters: Counters | None = None) -> None:
        self.counters: Counters = counters or NullCounters()
        self._by_type: dict[type[Resource], Resource] = {}

    def get(self, cls: type[R]) -> R | None:
        """The resource of type ``cls``, or None when nobody created one (a one-shot context)."""
        return cast("R | None", self._by_type.get(cls))

    def need(self, cls: type[R]) -> R:
        """The resource of type ``cls``, created now if there is none yet."""
        r = self.get(cls)
        if r is None:
            r = cls.create(self.counters)
            self._by_type[cls] = r
        return r

    def add(self, resource: Resource) -> None:
        """Use ``resource`` as the one of its type (tests, the one-shot CLI)."""
        self._by_type[type(resource)] = resource

    def configure(self, settings: Any, targets: Collection[str]) -> None:
        for r in self._by_type.values():
            r.configure(settings, targets)

    def open(self, kinds: Iterable[ProbeKind[Any]]) -> None:
        """Open, once each, the resources these kinds need."""
        for cls in dict.fromkeys(cls for kind in kinds for cls in kind.needs):
            self.need(cls).open()

    def info(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for r in self._by_type.values():
            out.update(r.info())
        return out

    def close(self) -> None:
        for r in self._by_type.values():
            r.close()


@dataclass
class ProbeContext:
    """Shared resources handed to every probe run."""

    resources: Resources = field(default_factory=Resources)
    counters: Counters = field(default_factory=NullCounters)
    budget: float = 0.6
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("edgeprobe.probe"))

    @classmethod
    def with_resources(cls, *resources: Resource, **kw: Any) -> ProbeContext:
        """A context holding these resources (tests, the one-shot CLI)."""
        ctx = cls(**kw)
        for r in resources:
            ctx.resources.add(r)
        return ctx


class Failed(Exception):
    """A run (or a step of one) ended with ``reason``, a bounded reason of its kind."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunAbandoned(Exception):
    """Raised by a probe whose machinery went away under it (e.g. the ICMP engine closed by a
    reload that changed ``icmp_mode``). Not a network outcome: the scheduler records nothing
    for the run, so no false loss is counted, and goes on with the next tick."""


class RunHandle(Protocol):
    """A run started by a kind's ``start``."""

    def cancel(self) -> None:
        """Abandon the run: nothing is recorded and its callback is not called."""


OptT = TypeVar("OptT", bound=CommonOptions)
ProbeFn = Callable[[Target, OptT, ProbeContext], Awaitable[ProbeResult]]
# The callback form of a probe: start the run now and return; the result (None: abandoned
# under it, e.g. its socket closed) goes to the callback exactly once, from the event loop,
# possibly before ``start`` returns. ``start`` returns None, without calling back, when this
# run needs the async ``run`` instead (e.g. a name to look up).
StartFn = Callable[
    [Target, OptT, ProbeContext, Callable[[ProbeResult | None], None]], RunHandle | None
]

# A socket could not be had: the process or the host is out of file descriptors (EMFILE,
# ENFILE) or of socket memory (ENOBUFS, ENOMEM). The agent's own condition, not the target's.
SOCKET_EXHAUSTED = "socket_exhausted"
# Reasons every kind may produce, beyond its own.
COMMON_REASONS: tuple[str, ...] = (
    "resolve_failed",
    "resolve_empty",
    "deadline",
    "exception",
    SOCKET_EXHAUSTED,
)


@dataclass(frozen=True)
class ProbeKind(Generic[OptT]):
    name: str
    options: type[OptT]
    run: ProbeFn[OptT]
    packet_based: bool = False
    phases: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    gauges: Mapping[str, str] = field(default_factory=dict)  # name -> HELP text
    metric_prefix: str = "probe"
    # Reasons a reply can be a stray (not a valid answer to anything in flight); pre-created in
    # edgeprobe_stray_packets_total{probe,reason} for every configured kind.
    stray_reasons: tuple[str, ...] = ()
    # True when ``run`` always returns by itself within run_time() plus a bounded name lookup,
    # so the scheduler need not arm a deadline timer of its own for every run.
    self_bounded: bool = False
    # Optional: lets the scheduler drive this kind from timer callbacks, without a task per
    # series that sleeps, awaits and wakes up for every run. Requires ``self_bounded``.
    start: StartFn[OptT] | None = None
    # Keys of ``ProbeResult.info`` this kind reports (labels of edgeprobe_probe_info).
    info_labels: tuple[str, ...] = ()
    # True when results carry ``hops`` (the per-hop families).
    per_hop: bool = False
    # Types of the shared resources ``run``/``start`` find in ``ctx.resources``.
    needs: tuple[type[Resource], ...] = ()
    # Gauges of a result that, at 1 or more, mean the target failed although the run
    # succeeded (e.g. a connect over the budget).
    failure_gauges: tuple[str, ...] = ()
    # Run this kind once, outside its ticks, when another series of the same target starts
    # failing: it then reports while the failure lasts (e.g. which hop went bad).
    run_on_target_failure: bool = False

    def failed(self, result: ProbeResult) -> bool:
        """Whether this run counts as a failure of its target."""
        return not result.success or any(
            result.gauges.get(g, 0.0) >= 1 for g in self.failure_gauges
        )

    @property
    def all_reasons(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.reasons, *COMMON_REASONS)))
