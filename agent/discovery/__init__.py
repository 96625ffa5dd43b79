"""Dynamic targets (file_sd, http_sd, DNS SRV): one module per source, the target groups they
share, and the manager (:mod:`.manager`)."""
