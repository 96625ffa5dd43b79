"""edgeprobe's agent. The version is said here once; pyproject.toml reads it."""

VERSION = "0.1.0"
