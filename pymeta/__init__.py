"""pymeta: meta-learning for PyTorch on compiled CPU/CUDA kernels.

The kernel core (``pymeta._C``) takes raw buffers and links no libtorch, so one build works
with any torch >= 2.5 and with plain numpy. See :mod:`pymeta.ops`.
"""
from . import _C  # the compiled core loads before torch: both import orders must work
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
