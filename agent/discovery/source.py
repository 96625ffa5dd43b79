"""What every target source has: its state (for metrics) and ``refresh()``."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.discovery.groups import REASONS, DiscoveredTarget, SDError


@dataclass
class SourceState:
    name: str
    kind: str  # file_sd | http_sd | dns_sd
    successful: bool = False
    targets: list[DiscoveredTarget] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    last_success_time: float = 0.0  # wall clock, for the timestamp metric only
    last_error: str = ""  # for logs and /config, never a label


class Source:
    """One source: ``refresh()`` fetches, keeps last good parts, and returns the full list."""

    kind = ""

    def __init__(self, name: str, interval: float) -> None:
        self.state = SourceState(name=name, kind=self.kind)
        self.interval = interval

    async def refresh(self) -> list[DiscoveredTarget]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class Partial(Exception):
    """Some parts failed: ``targets`` is the list with last-good parts kept."""

    def __init__(self, targets: list[DiscoveredTarget], errors: list[SDError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.targets = targets
        self.errors = errors


def outcome(
    merged: list[DiscoveredTarget], errors: list[SDError], max_targets: int
) -> list[DiscoveredTarget]:
    """The merged list of a source made of parts (files, DNS names): an error when it is too
    long, :class:`Partial` when some part failed (its last good targets are in ``merged``)."""
    if len(merged) > max_targets:
        raise SDError("too_many", f"more than {max_targets} targets")
    if errors:
        raise Partial(merged, errors)
    return merged
