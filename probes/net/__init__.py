"""Network machinery the probe kinds share: sockets and their options (``sockets``), the
kernel's error queue (``errqueue``), name resolution (``resolve``), paced datagram trains
(``train``) and the ICMP echo engine (``icmp``). Nothing here is a probe kind."""
