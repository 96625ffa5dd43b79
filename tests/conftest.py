"""What every test shares: the markers, and the checkout on the import path of the tests and of
every process they start (the lab and the bench are not installed with the agent;
``python -m lab.services``, ``python -m bench.rtc`` and the like run from the checkout)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import ROOT

MARKERS = (
    "lab: needs root and network namespaces (the lab)",
    "slow: takes more than a few seconds",
    "e2e: end-to-end with real Prometheus servers",
)

if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))
    )


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
