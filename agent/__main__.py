"""``python -m agent`` and the ``edgeprobe`` console script.

For ``run`` and ``route``, SIGHUP is ignored before anything else is imported: the imports
take ~0.4 s, and SIGHUP's default action would kill the process during them (a config reloader
may send it at any time). A reload asked for before the config is read is satisfied by reading
it; from then on the process' own handler reloads (the agent defers it until it has started)."""

import signal
import sys


def main() -> int:
    if sys.argv[1:2] in (["run"], ["route"]):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from agent.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
