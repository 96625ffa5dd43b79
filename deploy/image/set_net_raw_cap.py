"""Give a virtualenv's interpreter CAP_NET_RAW as a file capability (`setcap cap_net_raw+ep`).

Only the venv's interpreter (the agent's shebang) gets it, as a copy of the real one: the base
image's own /usr/local/bin/python3 stays plain. That matters because the kernel refuses to exec a
file whose capability is not in the caller's bounding set, so a sidecar or a health check
running with every capability dropped must not start a capability-carrying interpreter.

The slim base has no setcap, and installing libcap2-bin would pin a Debian package version in
the Dockerfile; the xattr format is small and stable (VFS_CAP_REVISION_2, linux/capability.h).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import sys
from pathlib import Path

CAP_NET_RAW = 13
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001


def net_raw_xattr() -> bytes:
    # magic_etc, then {permitted, inheritable} for capability words 0 (caps 0-31) and 1.
    # Effective too, so the agent needs no capset call of its own.
    return struct.pack(
        "<5I", VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, 1 << CAP_NET_RAW, 0, 0, 0
    )


def give_venv_net_raw(venv: Path) -> Path:
    bindir = venv / "bin"
    real = (bindir / "python").resolve()
    capped = bindir / "python-netraw"
    shutil.copy2(real, capped)
    os.setxattr(capped, "security.capability", net_raw_xattr())
    # Every interpreter name in the venv (console-script shebangs name python or python3),
    # as relative links so the venv stays relocatable (the tests build it outside /opt).
    for link in sorted(bindir.iterdir()):
        if link.is_symlink() and re.fullmatch(r"python(3(\.\d+)?)?", link.name):
            tmp = link.with_name(link.name + ".tmp")
            tmp.symlink_to(capped.name)
            tmp.replace(link)
    return capped


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} VENV", file=sys.stderr)
        return 2
    capped = give_venv_net_raw(Path(argv[1]))
    print(f"{capped}: cap_net_raw=ep")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
