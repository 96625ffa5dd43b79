"""Give a binary CAP_NET_RAW as a file capability (what `setcap cap_net_raw+ep FILE` does).

The slim base image has no setcap, and installing libcap2-bin for one call would pin a Debian
package version in the Dockerfile; the xattr format is small and stable (VFS_CAP_REVISION_2,
linux/capability.h), so the build writes it directly. Symlinks are followed: a venv's
`bin/python` points at the real interpreter, which is what exec() looks at.
"""

from __future__ import annotations

import os
import struct
import sys

CAP_NET_RAW = 13
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001


def net_raw_xattr() -> bytes:
    # magic_etc, then {permitted, inheritable} for capability words 0 (caps 0-31) and 1.
    return struct.pack("<5I", VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE,
                       1 << CAP_NET_RAW, 0, 0, 0)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} FILE", file=sys.stderr)
        return 2
    path = os.path.realpath(argv[1])
    os.setxattr(path, "security.capability", net_raw_xattr())
    print(f"{path}: cap_net_raw=ep")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
