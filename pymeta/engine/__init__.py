"""The training engine: run config, trainer, evaluation, checkpoints and metrics.

Learners work without it; it only drives them on episodes from :mod:`pymeta.data`.
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig
from .distributed import process_group
from .evaluate import evaluate, evaluate_runs
from .metrics import MetricsLog, mean_ci95
from .setup import SinusoidData, Splits, build_learner, build_splits, evaluate_split, load, train
from .trainer import Trainer, held_checkpoints

__all__ = ["RunConfig", "Trainer", "evaluate", "evaluate_runs", "mean_ci95", "MetricsLog",
           "save_checkpoint", "load_checkpoint", "Splits", "SinusoidData", "build_splits",
           "build_learner", "train", "evaluate_split", "load", "held_checkpoints",
           "process_group"]
