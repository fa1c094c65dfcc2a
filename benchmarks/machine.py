"""What every benchmark prints first: the machine its figures come from."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line: platform, CPU, cores, Python, and the 1-minute load average (other jobs distort timings)."""
    return (f"machine: {platform.platform()}; CPU {cpu_model()}; {os.cpu_count()} cores; "
            f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.2f}")
