"""glibc allocator settings for a scoring or serving process (standard library only; evaluation and
the benchmarks call it too).

    from runtime.memory import retain_freed_memory
    retain_freed_memory()          # once, at the start of a process that scores many blocks / queries
"""
from __future__ import annotations

import ctypes
import sys

MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30  # bytes, glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD


def retain_freed_memory() -> bool:
    """Let glibc keep freed blocks for reuse instead of handing them back to the OS at once.

    Blocks of pairs allocate and free tensors of ~16 MB many times a second; with glibc's
    defaults each is mapped afresh and its pages faulted in again (on a 2-core CPU that was
    ~15% of the torch scorer's time, in the kernel; a d = 1024 search query at shortlist 100 ran
    445 against 481 ms, benchmarks/README.md). Sets M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to
    MMAP_THRESHOLD (32 MB) and TRIM_THRESHOLD (1 GB) for this process. Called by the training,
    evaluation and search commands and the benchmarks; a no-op returning False off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return (bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD))
                and bool(libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)))
    except (OSError, AttributeError):
        return False
