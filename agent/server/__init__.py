"""The agent's HTTP side: the server (:mod:`.http`), the web config (:mod:`.webconfig` decodes
it, :mod:`.tls` builds its SSL contexts, :mod:`.guard` puts auth, headers and the rate limit to
work), token buckets (:mod:`.ratelimit`) and `/probe` (:mod:`.probe`)."""
