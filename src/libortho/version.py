"""The package version, in a module of its own so persistence code can stamp files without
importing the package ``__init__`` (which would run back up the house)."""

__version__ = "0.1.0"
