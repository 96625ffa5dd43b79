"""What the agent exports and how it is written: the protobuf exposition format and native
(sparse, exponential) histograms."""
