"""Peak resident memory of this process, for ``rpc.stats`` and the benchmarks."""

from __future__ import annotations

import sys


def max_rss_bytes() -> int:
    """Peak resident memory of this process in bytes; 0 where the OS does not say."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
