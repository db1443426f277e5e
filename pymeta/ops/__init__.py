"""pymeta's compiled ops, for torch tensors (CPU and CUDA) and numpy arrays.

- :func:`pairwise_distances`: batched query-to-support distances.
- :func:`class_prototypes`: batched per-class mean embeddings.
- :func:`sgd_step` / :func:`sgd_step_`: one fused SGD update over a list of tensors.
- :func:`batch_norm_relu_pool`: conv4's BatchNorm - ReLU - 2x2 max-pool tail in one pass
  (CPU, training-mode statistics, differentiable twice).

``pymeta.ops.reference`` holds plain-torch versions of each, used to check the kernels.
"""
from .batch_norm_relu_pool import batch_norm_relu_pool
from .class_prototypes import class_prototypes
from .pairwise_distances import METRICS, pairwise_distances
from .sgd_step import sgd_step, sgd_step_

__all__ = ["pairwise_distances", "class_prototypes", "sgd_step", "sgd_step_", "batch_norm_relu_pool",
           "METRICS"]
