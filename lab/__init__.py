"""The WAN lab: emulated regional paths to candidate edges, in network namespaces.

``with World.up(profiles=["id-jakarta"]) as world:`` builds a world (root only) and always
tears it down; ``python -m lab up|down|exec|truth|status`` does the same from a shell.
See docs/lab.md.
"""

from lab.topology import LabError, World, WorldState, lab_available

__all__ = ["LabError", "World", "WorldState", "lab_available"]
