"""``python -m agent`` and the ``edgeprobe`` console script.

For ``run``, SIGHUP is ignored before anything else is imported: the imports take ~0.4 s, and
SIGHUP's default action would kill the agent during them (a config reloader may send it at any
time). A reload asked for before the config is read is satisfied by reading it; from then on
the agent's own handler reloads (or defers the reload until the agent has started)."""

import signal
import sys


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from agent.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
