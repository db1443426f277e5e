"""Where datasets live on disk: one root directory, overridable per call or by environment."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PYMETA_DATA"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$PYMETA_DATA``, else :func:`user_cache`.

    Nothing is created; readers look for e.g. ``<root>/omniglot/`` below it.

    Example:
        >>> from pymeta.data import data_root
        >>> str(data_root("/srv/data"))
        '/srv/data'
        >>> (data_root() / "omniglot").name    # e.g. ~/.cache/pymeta/omniglot
        'omniglot'
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return user_cache()


def user_cache() -> Path:
    """The user's own pymeta folder: ``$XDG_CACHE_HOME/pymeta``, by default
    ``~/.cache/pymeta``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "pymeta"
