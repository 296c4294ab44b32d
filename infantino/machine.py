"""A note of the machine something ran on, kept with results and models (standard library only,
so bench/common.py can use it from another environment run in the project root)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys


def machine_info() -> dict:
    """Platform, processor, core count, Python version and the time (UTC)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
