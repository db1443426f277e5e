"""Few-shot data: in-memory class stores, dataset readers and episode samplers."""
from .classes import ImageClasses, concat

__all__ = ["ImageClasses", "concat"]
