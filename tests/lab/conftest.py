"""The lab's fixture: one world per module, built from the module's ``LAB_PROFILES`` and
``LAB_SERVICES`` (defaults: the shipped profiles, no services). Module-scoped because a world
takes ~0.3 s without services and ~1.5 s with; it always tears down, also after a failure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.spec import DEFAULT_PROFILES
from lab.topology import World
from tests.lab_helpers import skip_without_lab


@pytest.fixture(scope="module")
def lab_world(request: pytest.FixtureRequest) -> Iterator[World]:
    skip_without_lab()
    profiles = getattr(request.module, "LAB_PROFILES", DEFAULT_PROFILES)
    services = getattr(request.module, "LAB_SERVICES", False)
    with World.up(profiles=profiles, services=services) as world:
        yield world
