"""``edgeprobe route``: the routing map, from the central Prometheus to RTC signalling.

The statistics (miss upper confidence bound, RTT p95, eligibility) are recorded by the rules
of the ``edgeprobe-route-candidates`` group; this package holds the state (the incumbent per
region and the hold time of its challengers) and serves the decision. Modules: ``settings``
(the config file), ``promapi`` (the HTTP API client), ``policy`` (pure: ordering and
hysteresis), ``store`` (the versioned map, persisted atomically), ``server`` (HTTP and
/metrics), ``service`` (the query loop that ties them together).
"""
