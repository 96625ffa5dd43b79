"""What runs: the scheduler (:mod:`.scheduler`), per-series state (:mod:`.stats`), the budget
model (:mod:`.model`) and the agent's own counters (:mod:`.selfstats`)."""
