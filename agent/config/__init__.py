"""The config toolkit: one strict YAML decoder with line numbers (:mod:`.decode`), one set of
rules for names, labels, hosts and YAML documents (:mod:`.rules`), the agent's config model
(:mod:`.model`) and its loading (:mod:`.load`)."""
