"""What every test shares: the checkout on the import path of the tests and of every process
they start (the lab and the bench are not installed with the agent; ``python -m lab.services``,
``python -m bench.rtc`` and the like run from the checkout)."""

from __future__ import annotations

import os

from tests.helpers import ROOT

if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))
    )
