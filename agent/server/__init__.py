"""The agent's HTTP side: the server (:mod:`.http`), the web config (:mod:`.webconfig`: TLS, basic
auth, headers, rate limit; put to work by :mod:`.guard`), token buckets (:mod:`.ratelimit`) and
`/probe` (:mod:`.probe`)."""
