"""`GET /probe`: config and address categories (:mod:`.config`), what is refused
(:mod:`.policy`), its own resolver (:mod:`.resolver`) and the handler (:mod:`.handler`)."""
