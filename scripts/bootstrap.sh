#!/usr/bin/env bash
# Installs everything edgeprobe needs on a fresh Debian 12 machine, idempotently.
#   scripts/bootstrap.sh run   -> what `make run` needs (agent + lab tools)
#   scripts/bootstrap.sh test  -> everything the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"

SYSTEM_PKGS=(iproute2 iptables iputils-ping coturn dnsmasq-base prometheus prometheus-alertmanager libcap2-bin util-linux)
if [ "$what" = test ] || [ "$what" = bench ]; then
  SYSTEM_PKGS+=(fping prometheus-smokeping-prober procps)
fi

need_apt=0
for p in "${SYSTEM_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt=1
done
if [ "$need_apt" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing Debian packages (${SYSTEM_PKGS[*]}); run as root or install them" >&2
  else
    # Debian packages like prometheus, coturn and dnsmasq would start system services on
    # install; edgeprobe starts its own instances, so keep the package scripts from doing so.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${SYSTEM_PKGS[@]}" >/dev/null
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.edgeprobe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
