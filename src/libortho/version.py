"""The package version, in a module of its own so persistence code can stamp files without
importing the package ``__init__`` (which would run back up the house)."""

__version__ = "0.1.0"


def source_revision() -> dict[str, object] | None:
    """The git commit this package was imported from and whether its tree had uncommitted changes,
    or None outside a git checkout; results record it so a number can be traced to its code."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "src", "bench"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "src_dirty": bool(status.strip())}  # src/ or bench/ differ from the commit
