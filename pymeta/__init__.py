"""pymeta: meta-learning for PyTorch on compiled CPU/CUDA kernels.

The kernel core (``pymeta._C``) takes raw buffers and links no libtorch, so one build works
with any torch >= 2.5 and with plain numpy. See :mod:`pymeta.ops`.
"""
try:
    from . import _C  # the compiled core loads before torch: both import orders must work
except ImportError as error:
    import pathlib as _pathlib
    _here = _pathlib.Path(__file__).parent
    if any(_here.glob("_C*.so")) or any(_here.glob("_C*.pyd")):
        raise
    raise ImportError(
        f"pymeta's compiled core (pymeta._C) is not built in {_here}: this is a source checkout "
        "shadowing any installed pymeta. Install it (pip install .) and run Python from "
        "another directory, or install it in place: pip install -e .") from error
from . import ops
from ._info import info

__version__: str = _C.__version__



def load(path, map_location="cpu"):
    """Restore a trained learner from a checkpoint written by ``pymeta train``.

    See :func:`pymeta.engine.load`.
    """
    from .engine import load as _load  # the engine (and its data readers) load on demand
    return _load(path, map_location)


__all__ = ["ops", "info", "load", "__version__"]
