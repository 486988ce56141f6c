"""Errors a user can cause. Each carries a one-line message that says what to do."""


class QuickNetError(Exception):
    """Base class: the CLI prints `error: <message>` and exits 2, never a traceback."""


class DataError(QuickNetError):
    """Missing, truncated or wrong-checksum dataset."""


class StoreError(QuickNetError):
    """Model store problems: no such model or version, refusing to overwrite, bad metadata."""


class BuildError(QuickNetError):
    """A build stage cannot run (missing input artifact, accuracy gate, missing engine library)."""
