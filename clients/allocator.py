"""glibc's allocator, told to keep freed memory for reuse rather than hand it back.

Each forward pass of the CNN over a batch of 256 images allocates activations
of 13 MB, and frees them. glibc served them with fresh mappings, or trimmed
its heap's top after the free, so the next batch touched new pages: a
Fashion-MNIST evaluation (12,000 images) took 287,000 page faults on the
2-core CI machine, 1.4 s of its 3.4 s on one thread. With allocations under
:data:`MMAP_THRESHOLD` served from the heap and up to :data:`TRIM_THRESHOLD`
kept free at its top, it took none (``docs/benchmarks.md``, fix 14). A client's
DP-SGD call faulted less (6,000 times) and gains less.

The price is memory the process keeps: at most :data:`TRIM_THRESHOLD` free at
the top of each heap. Setting either threshold turns off glibc's own dynamic
adjustment of both. Elsewhere than glibc (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # allocations from 32 MiB get their own mapping
TRIM_THRESHOLD = 64 << 20  # free memory beyond 64 MiB at a heap's top goes back


def keep_freed_memory() -> bool:
    """Set this process's thresholds; ``False`` where the C library is not glibc.

    Idempotent and cheap (two ``mallopt`` calls): a Ray worker calls it with
    each message, the server once per run.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has mallopt as a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
