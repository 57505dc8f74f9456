"""Resident memory of this process, read from /proc (Linux)."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory in MiB.

    /proc's VmHWM belongs to this process image; `ru_maxrss` would also carry the peak of the
    parent that forked it (Linux keeps it across exec), so it is only the fallback.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
