"""Where a benchmark number came from: the commit, uncommitted files, the time it started."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git_state() -> dict[str, Any]:
    """The commit that measured the numbers, the code files that differed from it, and the start time."""
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()
    return {"commit": run("git", "rev-parse", "HEAD"),
            "dirty_files": run("git", "status", "--porcelain", "--", "src", "bench", "tests").splitlines(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
