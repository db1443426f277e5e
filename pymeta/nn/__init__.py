"""Backbones (embedding networks) for few-shot learners.

- :class:`Conv4`: the 4-block ConvNet (64-d on 28x28, 1600-d on 84x84).
- :class:`ResNet12`: the 12-layer residual network (640-d).
- :func:`mlp`: a plain perceptron (MAML's 1-40-40-1 sinusoid regressor by default).
- :func:`build_backbone`: a backbone by name; :func:`feature_dim`: output size of any module;
  :func:`evaluating`: eval mode for a block, each submodule's own mode restored after.
"""
from .backbones import BACKBONES, Conv4, ResNet12, build_backbone, evaluating, feature_dim, mlp

__all__ = ["Conv4", "ResNet12", "mlp", "BACKBONES", "build_backbone", "evaluating",
           "feature_dim"]
