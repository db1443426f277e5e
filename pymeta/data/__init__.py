"""Few-shot data: in-memory class stores, dataset readers and episode samplers."""
from .classes import ImageClasses, concat

# --- dataset readers -------------------------------------------------------------------
from .digits import load_digits
from .download import DownloadError, download_file, extract_zip_atomic
from .image_folder import FewShotImageFolder, load_image_folder
from .omniglot import load_omniglot, omniglot_urls, preprocess_omniglot
from .paths import data_root
from .runs import OneShotRun, load_runs, write_runs

__all__ = [
    "ImageClasses", "concat",
    # dataset readers
    "data_root", "download_file", "extract_zip_atomic", "DownloadError",
    "load_omniglot", "omniglot_urls", "preprocess_omniglot",
    "FewShotImageFolder", "load_image_folder", "load_digits",
    "OneShotRun", "load_runs", "write_runs",
]

# --- episode sampling ------------------------------------------------------------------
from .episodes import Episode, EpisodeSampler, episode_loader, fixed_episodes

__all__ += ["Episode", "EpisodeSampler", "episode_loader", "fixed_episodes"]

# --- regression tasks ------------------------------------------------------------------
from .sinusoid import SinusoidTasks, fixed_sinusoid_tasks

__all__ += ["SinusoidTasks", "fixed_sinusoid_tasks"]
