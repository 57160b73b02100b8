"""Summaries of a git diff, as recorded in PatchProduced."""

from __future__ import annotations

import hashlib
from typing import Any


def patch_stats(diff: str, numstat: str) -> dict[str, Any]:
    """sha256, size and counts; binary files count as changed with no line counts."""
    insertions = deletions = files = 0
    for line in numstat.splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        files += 1
        added, removed = parts[0], parts[1]
        if added.isdigit():
            insertions += int(added)
        if removed.isdigit():
            deletions += int(removed)
    encoded = diff.encode()
    return {
        "sha256": hashlib.sha256(encoded).hexdigest(),
        "bytes": len(encoded),
        "files_changed": files,
        "insertions": insertions,
        "deletions": deletions,
    }
