"""Sidecar: apply a changed ConfigMap to the running agent, without a restart.

The kubelet swaps a mounted ConfigMap's files in place (about a minute after the change) but
nothing tells the process. This polls the file's content and POSTs the agent's /-/reload when
it changes, like prometheus-operator's config-reloader does for Prometheus. Content, not mtime:
the kubelet's symlink swap can leave mtimes unchanged. A failed reload (the agent rejects a bad
config and keeps the old one) is retried on the next change only; the agent's
edgeprobe_config_last_reload_successful shows it.

Runs in the agent's image with the standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

log = logging.getLogger("config-reloader")


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for suffix in ("ms", "s", "m"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def digest(paths: list[Path]) -> str | None:
    h = hashlib.sha256()
    try:
        for p in paths:
            h.update(p.read_bytes())
            h.update(b"\0")
    except OSError:
        # Mid-swap or not mounted yet: try again on the next tick.
        return None
    return h.hexdigest()


def reload(url: str, timeout: float) -> bool:
    """True once the agent answered, whether or not it accepted the new config."""
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        # The agent keeps its old config; asking again would not change its mind.
        log.warning("agent rejected the new config: HTTP %d", e.code)
        return True
    except (urllib.error.URLError, OSError) as e:
        log.warning("reload failed: %s", type(e).__name__)
        return False


def run(paths: list[Path], url: str, interval: float, stop: threading.Event,
        max_ticks: int | None = None) -> int:
    """Poll until ``stop`` is set (or ``max_ticks`` polls). Returns the number of reloads."""
    last = digest(paths)
    pending = False
    reloads = ticks = 0
    while not stop.wait(interval):
        ticks += 1
        cur = digest(paths)
        if cur is not None and cur != last:
            last = cur
            pending = True
            log.info("config changed")
        # The agent may be briefly unreachable (starting); keep the change pending until a
        # reload request is answered, whatever the agent thought of the new config.
        if pending and reload(url, timeout=max(1.0, interval)):
            pending = False
            reloads += 1
            log.info("reload requested")
        if max_ticks is not None and ticks >= max_ticks:
            break
    return reloads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--watch", action="append", required=True, type=Path,
                    help="file to watch (repeatable)")
    ap.add_argument("--url", default="http://127.0.0.1:9798/-/reload")
    ap.add_argument("--interval", default="10s", type=parse_duration)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s component=config-reloader "
                               "msg=%(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("watching %s every %.3gs", ",".join(map(str, args.watch)), args.interval)
    run(args.watch, args.url, args.interval, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
