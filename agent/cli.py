"""Command line: ``edgeprobe run | check-config | probe | route`` in the Prometheus exporter
style."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import resource
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import uvloop

from agent import VERSION, logs
from agent.config import load as cfgmod
from agent.config.decode import ConfigError, parse_duration
from agent.config.model import ModelConfig
from agent.runtime import model
from agent.runtime.stats import jitter_of, quantile

if TYPE_CHECKING:
    from aiohttp import web

    from agent.server.guard import WebGuard
    from agent.server.http import WebLimits

CfgT = TypeVar("CfgT")

log = logging.getLogger("edgeprobe")
DEFAULT_LISTEN = ":9798"
DEFAULT_ROUTE_LISTEN = ":9799"


def _duration(s: str) -> float:
    try:
        return parse_duration(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeprobe",
        description="Probe RTC edge nodes continuously and export RTT, jitter, loss and "
        "connect-budget metrics to Prometheus.",
    )
    p.add_argument("--version", action="version", version=f"edgeprobe {VERSION}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def web_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--web.config.file",
            dest="web_config_file",
            default=None,
            metavar="PATH",
            help="TLS and basic auth, in the Prometheus exporter-toolkit format",
        )
        sp.add_argument(
            "--web.read-header-timeout",
            dest="read_header_timeout",
            type=_duration,
            default="10s",
            metavar="DURATION",
            help="close a connection whose request header (TLS handshake "
            "included) is not complete this long after it was opened or, on "
            "a kept-alive connection, after its first byte (default 10s)",
        )
        sp.add_argument(
            "--web.idle-timeout",
            dest="idle_timeout",
            type=_duration,
            default="75s",
            metavar="DURATION",
            help="close a kept-alive connection idle this long between requests (default 75s)",
        )
        sp.add_argument(
            "--web.max-connections",
            dest="max_connections",
            type=int,
            default=512,
            metavar="N",
            help="most web connections open at once (default 512), also bounded "
            "by RLIMIT_NOFILE minus what the probes need; at the limit a new "
            "connection evicts the one idle longest, or is closed at accept",
        )

    def log_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--log.format",
            dest="log_format",
            choices=("logfmt", "json"),
            default="logfmt",
            help="log format (default: logfmt)",
        )
        sp.add_argument(
            "--log.level",
            dest="log_level",
            default="info",
            choices=("debug", "info", "warning", "error"),
        )

    r = sub.add_parser(
        "run",
        help="run the agent and serve /metrics",
        description="Run the agent: probe the configured targets and serve "
        "/metrics, /-/healthy, /-/ready and POST /-/reload. "
        "SIGHUP reloads the config; SIGTERM/SIGINT stop it.",
    )
    r.add_argument(
        "--config.file", dest="config_file", required=True, metavar="PATH", help="YAML config file"
    )
    r.add_argument(
        "--web.listen-address",
        dest="listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR",
        help=f"address to serve on (default {DEFAULT_LISTEN})",
    )
    r.add_argument(
        "--config.watch",
        dest="config_watch",
        action="store_true",
        help="also reload when the config file changes (polled)",
    )
    web_flags(r)
    log_flags(r)

    c = sub.add_parser(
        "check-config",
        help="validate a config file and exit",
        description="Validate a config file: exit 0 if it is valid, non-zero "
        "with the error (key path and line) otherwise.",
    )
    c.add_argument("path", metavar="PATH")

    pr = sub.add_parser(
        "probe",
        help="one-shot probe of hosts, with a budget verdict",
        description="Ping each HOST once with a train of ICMP echoes and print "
        "an mtr/fping-style summary plus a verdict against the "
        "connect budget.",
    )
    pr.add_argument("hosts", nargs="+", metavar="HOST")
    pr.add_argument("-c", "--count", type=int, default=10, help="packets per host (default 10)")
    pr.add_argument(
        "--spacing", type=_duration, default=0.1, help="time between packets (default 100ms)"
    )
    pr.add_argument(
        "--timeout", type=_duration, default=1.0, help="per-packet timeout (default 1s)"
    )
    pr.add_argument("--budget", type=_duration, default=0.6, help="connect budget (default 600ms)")
    pr.add_argument("--size", type=int, default=56, help="payload bytes (default 56)")
    pr.add_argument("--ip-family", choices=("auto", "ipv4", "ipv6"), default="auto")
    pr.add_argument("--icmp-mode", choices=("auto", "privileged", "unprivileged"), default="auto")
    pr.add_argument("--json", action="store_true", help="print JSON with per-packet RTTs")
    log_flags(pr)

    ro = sub.add_parser(
        "route",
        help="serve the routing map from the central Prometheus",
        description="Read the route candidates from the central Prometheus, "
        "keep a stable first choice per region (hysteresis) and "
        "serve the routing map: GET /v1/map, GET /v1/regions/"
        "REGION, /metrics, /-/healthy, /-/ready. SIGHUP reloads "
        "the web config; SIGTERM/SIGINT stop it. See "
        "docs/routing.md.",
    )
    ro.add_argument(
        "--config.file",
        dest="config_file",
        default=None,
        metavar="PATH",
        help="YAML config file (default: every setting at its default)",
    )
    ro.add_argument(
        "--web.listen-address",
        dest="listen",
        default=DEFAULT_ROUTE_LISTEN,
        metavar="ADDR",
        help=f"address to serve on (default {DEFAULT_ROUTE_LISTEN})",
    )
    web_flags(ro)
    log_flags(ro)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        try:
            cfg = cfgmod.load(args.path)
        except ConfigError as e:
            print(f"edgeprobe: config error: {e}", file=sys.stderr)
            return 1
        print(f"{args.path}: OK ({len(cfg.jobs)} probe series, region {cfg.agent.region})")
        return 0
    logs.setup(args.log_format, args.log_level)
    if args.command in ("run", "route"):
        raise_fd_limit()
    if args.command == "route":
        return uvloop.run(_route(args))
    if args.command == "run":
        # Before the signal handlers of _run are installed, a SIGHUP (the default action
        # kills) is ignored: a reload asked for before the config is read is satisfied by
        # reading it. agent/__main__.py does the same before the imports.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # /metrics renders in a thread; a short GIL switch interval lets the event loop thread,
        # which times the probes, take the GIL back quickly while a large scrape renders.
        sys.setswitchinterval(0.0005)
        return uvloop.run(_run(args))
    if args.count < 1 or args.count > 10000:
        print("edgeprobe: --count must be between 1 and 10000", file=sys.stderr)
        return 2
    return uvloop.run(_probe(args))


async def _run(args: argparse.Namespace) -> int:
    # Signal handlers first, before anything can answer (a /-/healthy answer may be what
    # makes a config reloader send SIGHUP).
    loop = asyncio.get_running_loop()
    stop = _stop_on_signals()
    hups = HupReloads()
    loop.add_signal_handler(signal.SIGHUP, hups.request)

    from agent.app import Agent
    from agent.server.http import ProbeFdReserve, build_app

    setup = _web_setup(args, lambda: cfgmod.load(args.config_file))
    if isinstance(setup, int):
        return setup
    cfg, guard, limits = setup
    agent = Agent(cfg, Path(args.config_file), web_guard=guard)
    app = build_app(agent, middlewares=guard.middlewares())
    runner = await _listen(args, app, guard, limits, ProbeFdReserve(agent))
    if runner is None:
        return 1
    await agent.start()
    hups.start(agent)
    watcher = loop.create_task(_watch(agent, Path(args.config_file))) if args.config_watch else None
    await stop.wait()
    log.info("shutting down")
    if watcher is not None:
        watcher.cancel()
    await hups.close(timeout=3.0)
    await agent.stop(grace=3.0)
    await runner.cleanup()
    return 0


class HupReloads:
    """SIGHUP → ``agent.reload()``. Deferred until the agent has started (a reload asked for
    during start-up runs once it has), and coalesced: SIGHUPs during a reload make one more
    reload after it, not one each."""

    def __init__(self) -> None:
        self.agent: Any = None
        self.task: asyncio.Task[tuple[bool, str]] | None = None
        self.pending = False
        self.closed = False

    def request(self) -> None:
        if self.closed:
            return
        if self.agent is None or self.task is not None:
            self.pending = True
            return
        self.task = asyncio.get_running_loop().create_task(self.agent.reload())
        self.task.add_done_callback(self._done)

    def start(self, agent: Any) -> None:
        self.agent = agent
        self._again()

    async def close(self, timeout: float) -> None:
        self.closed = True
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=timeout)

    def _done(self, _: asyncio.Task[tuple[bool, str]]) -> None:
        self.task = None
        self._again()

    def _again(self) -> None:
        if self.pending:
            self.pending = False
            self.request()


async def _route(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = _stop_on_signals()

    from agent.route import settings
    from agent.route.server import build_app as build_route_app
    from agent.route.service import RouteService
    from agent.server.webconfig import WebConfigError

    setup = _web_setup(
        args,
        lambda: settings.load(args.config_file) if args.config_file else settings.RouteConfig(),
    )
    if isinstance(setup, int):
        return setup
    cfg, guard, limits = setup

    def reload_web() -> None:
        try:
            guard.reload()
            log.info("web config reloaded")
        except WebConfigError as e:
            log.error("web config reload failed; keeping the running one", extra={"error": str(e)})

    loop.add_signal_handler(signal.SIGHUP, reload_web)
    svc = RouteService(cfg)
    svc.registry.register(guard)
    svc.load_state()  # served before the first query completes
    app = build_route_app(svc, middlewares=guard.middlewares())
    runner = await _listen(args, app, guard, limits)
    if runner is None:
        return 1
    log.info(
        "route started", extra={"prometheus": cfg.prometheus.url, "state_file": cfg.map.state_file}
    )
    await svc.run(stop)
    log.info("shutting down")
    await runner.cleanup()
    return 0


async def _watch(agent: Any, path: Path, period: float = 2.0) -> None:
    """Reload when the file's (mtime, size, inode) changes: works with ConfigMap symlink swaps."""

    def sig() -> tuple[float, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime, st.st_size, st.st_ino

    last = sig()
    while True:
        await asyncio.sleep(period)
        cur = sig()
        if cur is not None and cur != last:
            last = cur
            await agent.reload()


async def _probe(args: argparse.Namespace) -> int:
    from probes.base import ProbeContext, Target
    from probes.icmp import IcmpOptions
    from probes.icmp import run as icmp_run
    from probes.net.icmp import IcmpEngines
    from probes.net.resolve import ResolveError, Resolver

    engines = IcmpEngines(mode=args.icmp_mode)
    resolver = Resolver()
    ctx = ProbeContext.with_resources(engines, resolver)
    run_time = (args.count - 1) * args.spacing + args.timeout
    opts = IcmpOptions(
        interval=run_time,
        packets=args.count,
        spacing=args.spacing,
        timeout=args.timeout,
        payload_size=args.size,
        ip_family=args.ip_family,
    )
    problems = opts.validate()
    if problems:
        print(f"edgeprobe: {problems[0]}", file=sys.stderr)
        return 2

    async def one(host: str) -> dict[str, Any]:
        address = ""
        with contextlib.suppress(ResolveError):
            address = (await resolver.resolve(host, args.ip_family)).address
        res = await icmp_run(Target(name=host, address=host), opts, ctx)
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        eng = engines.engines.get(fam)
        return summarize(
            host,
            address,
            res.rtts,
            res.packet_ids,
            res.reason,
            args.budget,
            eng.ident if eng else None,
        )

    try:
        rows = await asyncio.gather(*(one(h) for h in args.hosts))
    finally:
        engines.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows, args.budget))
    return 0 if all(r["verdict"] != "FAIL" for r in rows) else 3


def summarize(
    host: str,
    address: str,
    rtts: list[float | None],
    ids: list[int],
    reason: str,
    budget: float,
    icmp_id: int | None,
) -> dict[str, Any]:
    answered = sorted(r for r in rtts if r is not None)
    lost = len(rtts) - len(answered)
    jitter = jitter_of(rtts)
    d = ModelConfig()
    pred = model.predict(answered, lost, jitter, budget, d.round_trips, d.fixed, d.exchanges)
    upper = model.wilson_interval(lost, len(rtts))[1]
    if pred is None or not answered or pred.estimate > budget or pred.miss_probability > 0.05:
        verdict = "FAIL"
    elif pred.miss_probability > 0.01 or pred.estimate > 0.8 * budget:
        verdict = "MARGINAL"
    else:
        verdict = "PASS"

    def ms(v: float) -> float | None:
        return None if math.isnan(v) or math.isinf(v) else round(v * 1000, 3)

    return {
        "host": host,
        "address": address,
        "icmp_id": icmp_id,
        "sent": len(rtts),
        "lost": lost,
        "loss_ratio": lost / len(rtts) if rtts else 0.0,
        "loss_ratio_upper95": upper,
        "min_ms": ms(answered[0]) if answered else None,
        "median_ms": ms(quantile(answered, 0.5)),
        "p95_ms": ms(quantile(answered, 0.95)),
        "max_ms": ms(answered[-1]) if answered else None,
        "jitter_ms": ms(jitter),
        "connect_estimate_ms": ms(pred.estimate) if pred else None,
        "budget_miss_probability": pred.miss_probability if pred else 1.0,
        "mos": round(pred.mos, 2) if pred else None,
        "reason": reason,
        "verdict": verdict,
        "rtts": rtts,
        "packet_ids": ids,
    }


def render_table(rows: list[dict[str, Any]], budget: float) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    head = (
        "HOST",
        "SENT",
        "LOST",
        "LOSS%",
        "≤LOSS%95",
        "MIN",
        "MED",
        "P95",
        "MAX",
        "JITTER",
        "EST",
        "P(MISS)",
        "VERDICT",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["host"],
                str(r["sent"]),
                str(r["lost"]),
                f"{100 * r['loss_ratio']:.1f}",
                f"{100 * r['loss_ratio_upper95']:.1f}",
                f(r["min_ms"]),
                f(r["median_ms"]),
                f(r["p95_ms"]),
                f(r["max_ms"]),
                f(r["jitter_ms"]),
                f(r["connect_estimate_ms"]),
                f"{r['budget_miss_probability']:.3f}",
                r["verdict"]
                if r["verdict"] != "FAIL" or r["reason"] == "ok"
                else f"FAIL ({r['reason']})",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines
    ]
    d = ModelConfig()
    out.append(
        f"RTT in ms. EST = {d.round_trips:g}×median RTT + {d.fixed * 1000:g} ms (cold "
        f"connect); P(MISS) = model probability of missing the {budget * 1000:g} ms "
        "budget; ≤LOSS%95 = 95 % Wilson upper bound."
    )
    return "\n".join(out)


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as the Go runtime does for Go exporters.
    The usual soft default (1024) dates from select(), which nothing here uses, and every probe
    run and web connection holds descriptors. Before anything listens: the web server's
    connection cap reads the limit. Logged once, raised or not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses a soft limit above fs.nr_open, and "unlimited" is above it.
        try:
            want = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            want = soft
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as e:
            log.warning(
                "could not raise the soft file descriptor limit",
                extra={"soft": soft, "hard": _limit(hard), "error": str(e)},
            )
            return
    log.info(
        "file descriptor limit",
        extra={
            "soft": _limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
            "hard": _limit(hard),
            "was": _limit(soft),
        },
    )


def _limit(n: int) -> int | str:
    return "unlimited" if n == resource.RLIM_INFINITY else n


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    return stop


def _web_setup(
    args: argparse.Namespace, load_config: Callable[[], CfgT]
) -> tuple[CfgT, WebGuard, WebLimits] | int:
    """What ``run`` and ``route`` read before they serve: the config (``load_config``), the web
    config (``--web.config.file``) and the web server's limits; or, after saying why, the exit
    code (2 for invalid flags, 1 for an invalid config or web config)."""
    from agent.server.guard import WebGuard
    from agent.server.http import WebLimits
    from agent.server.webconfig import WebConfigError

    limits = WebLimits(
        read_header_timeout=args.read_header_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
    )
    if limits.problems():
        print(f"edgeprobe: {limits.problems()[0]}", file=sys.stderr)
        return 2
    try:
        cfg = load_config()
    except ConfigError as e:
        log.error("invalid config", extra={"error": str(e)})
        print(f"edgeprobe: config error: {e}", file=sys.stderr)
        return 1
    try:
        guard = WebGuard(args.web_config_file)
    except WebConfigError as e:
        log.error("invalid web config", extra={"error": str(e)})
        print(f"edgeprobe: web config error: {e}", file=sys.stderr)
        return 1
    return cfg, guard, limits


async def _listen(
    args: argparse.Namespace,
    app: web.Application,
    guard: WebGuard,
    limits: WebLimits,
    reserve: Callable[[], int] = lambda: 0,
) -> web.AppRunner | None:
    """``app`` served on ``--web.listen-address`` with the web config's TLS, within ``limits``
    (``reserve``: the file descriptors the probes need, see ``serve``); None, after saying
    why, when it cannot listen."""
    from agent.server.http import serve

    try:
        return await serve(
            app, args.listen, ssl_context=guard.ssl_context, limits=limits, reserve=reserve
        )
    except (OSError, ValueError) as e:
        print(f"edgeprobe: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return None
