"""glibc malloc tuning for processes that pymeta owns (the CLI and benchmarks)."""
from __future__ import annotations


def retain_freed_memory() -> str:
    """Makes glibc keep freed memory for reuse instead of returning it to the OS.

    By default glibc serves big allocations with fresh mmap pages and hands them back on free,
    so every op output of a few MB pays first-touch page faults on every call (about 2.3 us per
    4 KiB page on the reference VM), which swamps kernels of a millisecond and varies with the
    malloc history. A training loop that keeps allocating tensors of the same sizes reuses
    its heap instead; this setting measures that steady state, for every implementation
    alike. The CLI's training and evaluation use it too: big evaluation batches ran 2.5x
    faster with it here. Returns a description for the results.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30):
            return "retained (glibc mmap and trim thresholds 1 GiB)"
    except (OSError, AttributeError):
        pass
    return "default"
