"""What the agent exports and how it is written: the one list of metric families (:mod:`.catalog`),
the collector over the stats store (:mod:`.collector`), the protobuf exposition format
(:mod:`.protobuf`) and native (sparse, exponential) histograms (:mod:`.native`)."""
