"""The benchmark: edgeprobe against fping and smokeping_prober, 100 to 10,000 targets.

``python -m bench [--quick] [--out DIR]`` (root). See docs/bench.md.
"""
