#!/usr/bin/env bash
# The main job: an agent with the offline default world. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/edgeprobe run --config.file=examples/loopback.yaml --web.listen-address=127.0.0.1:9798
