# syntax=docker/dockerfile:1
#
# edgeprobe agent image.
#
#   make image                                       # the build below, labelled with agent.VERSION
#   docker build -t edgeprobe .                      # default: unprivileged ICMP (ping_group_range)
#   docker build -t edgeprobe:netraw --target netraw .   # CAP_NET_RAW as a file capability
#
# The agent runs as uid/gid 10001 with no capabilities. It needs ICMP echo, which Linux gives to
# a non-root process in one of two ways; the agent logs at start-up which one it got
# (icmp_mode=unprivileged or icmp_mode=privileged) and exports it in edgeprobe_build_info:
#
#   1. unprivileged: ICMP datagram sockets, allowed for the groups in the network namespace's
#      sysctl net.ipv4.ping_group_range. It is a namespaced, Kubernetes-"safe" sysctl:
#        docker run --sysctl net.ipv4.ping_group_range="10001 10001" --cap-drop ALL edgeprobe
#   2. privileged: raw sockets with CAP_NET_RAW and nothing else, either
#      a. as a file capability on the interpreter (the `netraw` target below):
#           docker run --cap-drop ALL --cap-add NET_RAW edgeprobe:netraw
#         (not together with no-new-privileges / allowPrivilegeEscalation: false, which stop
#         the kernel from granting file capabilities), or
#      b. as an ambient capability: start as root with only NET_RAW and let setpriv(1) drop to
#         the agent's user while keeping it:
#           docker run --cap-drop ALL --cap-add NET_RAW --cap-add SETUID --cap-add SETGID \
#             --user 0 --entrypoint setpriv edgeprobe \
#             --reuid=10001 --regid=10001 --clear-groups --inh-caps=-all,+net_raw \
#             --ambient-caps=-all,+net_raw \
#             /opt/edgeprobe/bin/edgeprobe run --config.file=/etc/edgeprobe/edgeprobe.yml
#
# The config lives at /etc/edgeprobe/edgeprobe.yml. The image carries a loopback-only example
# there so that it starts and reports healthy as built; mount the real one over it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent/ ./agent/
COPY probes/ ./probes/
# The slim base has no compiler: every dependency must come as a wheel (uvloop, aiohttp,
# bcrypt, ...). A missing wheel fails the build here instead of compiling from source.
RUN python -m venv /opt/edgeprobe \
 && /opt/edgeprobe/bin/pip install --only-binary=:all: --no-binary=edgeprobe /src

FROM ${PYTHON_IMAGE} AS base
# The version is said once, in agent/__init__.py; `make image` passes it (and the commit) here.
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="edgeprobe" \
      org.opencontainers.image.description="Probes RTC edge nodes (ICMP, TCP, TLS, HTTP, DNS, UDP/STUN) and exports to Prometheus" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/edgeprobe" \
      org.opencontainers.image.documentation="https://github.com/example/edgeprobe/blob/main/docs/operations/deploy.md"
ENV PATH=/opt/edgeprobe/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# /var/lib/edgeprobe-route: `edgeprobe route`'s state (its last good map). Owned by the user so
# that a fresh named volume mounted there (Docker copies the directory's owner) is writable.
RUN groupadd --system --gid 10001 edgeprobe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin edgeprobe \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/edgeprobe-route
COPY --from=build /opt/edgeprobe /opt/edgeprobe
COPY deploy/image/edgeprobe.yml /etc/edgeprobe/edgeprobe.yml
WORKDIR /
# 9798: the agent (`run`); 9799: `edgeprobe route`.
EXPOSE 9798 9799
# No curl in the slim base; the base interpreter is there anyway (not the venv's, which in the
# netraw target carries a file capability).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["/usr/local/bin/python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9798/-/healthy', timeout=4)"]
USER 10001:10001
ENTRYPOINT ["/opt/edgeprobe/bin/edgeprobe"]
CMD ["run", "--config.file=/etc/edgeprobe/edgeprobe.yml", "--web.listen-address=:9798"]

# CAP_NET_RAW as a file capability on the venv's interpreter only (a copy of the base one; see
# the script for why). Permitted and effective, so the agent needs no capset code.
FROM base AS netraw
USER 0:0
RUN --mount=type=bind,source=deploy/image/set_net_raw_cap.py,target=/tmp/set_net_raw_cap.py \
    ["/usr/local/bin/python3", "/tmp/set_net_raw_cap.py", "/opt/edgeprobe"]
USER 10001:10001

# The default target, last so that a plain `docker build` produces it.
FROM base AS runtime
