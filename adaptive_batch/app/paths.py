"""Where the command-line tools keep files that outlive a run (decoded data caches)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "user_cache_dir"]

#: Overrides the cache folder (a shared disk, a scratch volume).
CACHE_ENV = "ADAPTIVE_BATCH_CACHE"


def user_cache_dir() -> Path:
    """``$ADAPTIVE_BATCH_CACHE``, else ``$XDG_CACHE_HOME/adaptive_batch``, else
    ``~/.cache/adaptive_batch``: outside any working tree, so no cache lands in a repository.

    >>> import os
    >>> os.environ[CACHE_ENV] = "/tmp/ab-cache"
    >>> str(user_cache_dir())
    '/tmp/ab-cache'
    >>> del os.environ[CACHE_ENV]
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "adaptive_batch"
