"""Transport limits of the HTTP API, importable without Klein or twisted.web."""

__all__ = ["DEFAULT_MAX_BODY_SIZE"]

DEFAULT_MAX_BODY_SIZE = 1024 * 1024
