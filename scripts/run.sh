#!/usr/bin/env bash
# The main job (`make run`): the whole system, as in production, on this machine.
#
# With root on Linux: the lab (three emulated regions, id-jakarta, br-saopaulo and ae-dubai,
# with their candidate edges and edge services), one agent per region inside its namespace,
# one Prometheus in agent mode per region (scrapes that region's agent, remote-writes), a
# central Prometheus with the rules of deploy/prometheus/rules/ on 127.0.0.1:9090 (a free port
# if taken), and an Alertmanager that sends nowhere if it is installed. Without root: one
# agent on examples/loopback.yaml and a single Prometheus with the rules (if installed).
# It prints what to look at, then the best edge per region and the alerts as they change.
# Ctrl-C (or SIGTERM) stops everything it started and removes its state (run/), keeping
# run/logs/. The orchestration is lab/stack.py.
#   EDGEPROBE_LAB=0 scripts/run.sh       the loopback world even as root
#   EDGEPROBE_RUN_DIR=DIR scripts/run.sh  state somewhere else than run/
#   scripts/run.sh --production-intervals | --prometheus-port N | --no-alertmanager
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m lab.stack "$@"
