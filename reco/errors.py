"""Exceptions with messages that name the file, row or option at fault."""


class RecoError(Exception):
    """Base class: a user-facing error with a clear message."""


class ConfigError(RecoError):
    """A bad option or configuration value (names the option)."""


class FormatError(RecoError):
    """An on-disk file does not match its declared format (names the file, and row if known)."""


class MismatchError(RecoError):
    """Two artefacts do not belong together (e.g. index built with another model than the queries)."""
