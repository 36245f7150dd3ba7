"""clt: circuit tracing with cross-layer transcoders — extract, train, attribute, visualise."""

__version__ = "0.1.0"
