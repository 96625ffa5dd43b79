"""``file_sd``: Prometheus target-group files (JSON or YAML), polled; a bad file keeps its last
good list."""

from __future__ import annotations

import asyncio
import glob
import os
from pathlib import Path

from agent.discovery.config import FileSDConfig
from agent.discovery.groups import DiscoveredTarget, SDError, decode_sd_text, parse_groups
from agent.discovery.source import Source, outcome


class FileSD(Source):
    kind = "file_sd"

    def __init__(self, cfg: FileSDConfig, base_dir: Path = Path(".")) -> None:
        super().__init__(cfg.name, cfg.poll_interval)
        self.cfg = cfg
        self.base_dir = base_dir
        self._stamp: dict[str, tuple[int, int, int]] = {}
        self._last_good: dict[str, list[DiscoveredTarget]] = {}

    def _paths(self) -> list[str]:
        out: list[str] = []
        for pat in self.cfg.files:
            p = pat if os.path.isabs(pat) else str(self.base_dir / pat)
            out += sorted(glob.glob(p)) if glob.has_magic(p) else [p] if os.path.exists(p) else []
        return list(dict.fromkeys(out))

    async def refresh(self) -> list[DiscoveredTarget]:
        paths = await asyncio.to_thread(self._paths)
        errors: list[SDError] = []
        for gone in set(self._last_good) - set(paths):
            self._last_good.pop(gone, None)
            self._stamp.pop(gone, None)
        for p in paths:
            try:
                st = os.stat(p)
            except OSError as e:
                errors.append(SDError("io", f"{p}: {e.strerror}"))
                continue
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._stamp.get(p) == stamp:
                continue
            try:
                self._last_good[p] = await asyncio.to_thread(self._read, p, st.st_size)
                self._stamp[p] = stamp
            except SDError as e:
                # Keep the file's previous targets; retry on the next poll even if the
                # stamp does not change (the problem may have been a transient read error).
                self._stamp.pop(p, None)
                errors.append(SDError(e.reason, f"{p}: {e}"))
        merged: list[DiscoveredTarget] = []
        seen: set[str] = set()
        for p in paths:
            for t in self._last_good.get(p, []):
                if t.target.name in seen:
                    errors.append(
                        SDError(
                            "invalid", f"{p}: duplicate target name {t.target.name!r} across files"
                        )
                    )
                    continue
                seen.add(t.target.name)
                merged.append(t)
        return outcome(merged, errors, self.cfg.max_targets)

    def _read(self, path: str, size: int) -> list[DiscoveredTarget]:
        if size > self.cfg.max_file_bytes:
            raise SDError("too_large", f"larger than {self.cfg.max_file_bytes} bytes")
        try:
            with open(path, "rb") as f:
                data = f.read(self.cfg.max_file_bytes + 1)
        except OSError as e:
            raise SDError("io", e.strerror or "read error") from None
        if len(data) > self.cfg.max_file_bytes:
            raise SDError("too_large", f"larger than {self.cfg.max_file_bytes} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SDError("parse", "not UTF-8") from None
        doc = decode_sd_text(text, yaml_format=not path.endswith(".json"))
        return parse_groups(doc, self.cfg.name, self.cfg.probes, self.cfg.max_targets)
