#!/usr/bin/env bash
# The whole suite: lint, types, then pytest (unit, lab, end-to-end). Run via `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite runs in a network namespace of its own that has only loopback: a test that tried to
# reach anything outside finds no route, and every server a test starts is invisible to the host.
# The lab's namespaces are created from inside it. Without the privilege for that (not root), the
# tests run in the host's namespace and each still binds loopback only.
if [ -z "${EDGEPROBE_TEST_NETNS:-}" ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  # The image test installs the package the way the Dockerfile does; inside the namespace there
  # is no package index, so everything that install needs is put in a wheelhouse first.
  wh="$PWD/.venv/wheelhouse"
  .venv/bin/python -m pip wheel -q --disable-pip-version-check --only-binary=:all: \
    --no-binary=edgeprobe -w "$wh" . setuptools wheel >/dev/null
  export EDGEPROBE_WHEELHOUSE="$wh"
  export EDGEPROBE_TEST_NETNS=1
  exec unshare -n -- bash -c 'ip link set lo up && exec "$0" "$@"' "$0" "$@"
fi
scripts/lint.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== pytest"
exec python -m pytest -q -p no:cacheprovider "$@"
