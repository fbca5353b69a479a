"""The separation methods, one file each; every file registers itself in ``SEPARATION``."""
