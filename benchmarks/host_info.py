"""What machine a benchmark ran on, for its report (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def host_info() -> dict:
    """CPU model and core count from /proc/cpuinfo, load average, Python and torch versions.

    The load average is part of it because other processes on the same cores make every
    timing slower, and a report should say so.
    """
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
              if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": len(models) or os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def host_line(info: dict | None = None) -> str:
    """One line: "<cpu>, <n> cores, torch <version> (<threads> threads)"."""
    info = info or host_info()
    return (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} "
            f"({info['torch_threads']} threads)")


def run_stamp(script: str, argv: list[str] | None) -> dict:
    """{"command", "host", "date"} of a benchmark run (argv None: the process's own)."""
    import sys
    import time

    args = sys.argv[1:] if argv is None else argv
    return {"command": " ".join([f"python benchmarks/{script}", *args]), "host": host_line(host_info()),
            "date": time.strftime("%Y-%m-%d")}


def stamp_lines(report: dict) -> list[str]:
    """The Markdown lines naming a report's command, machine and date."""
    return [f"Command: `{report['command']}`  ", f"Machine: {report['host']}  ", f"Date: {report['date']}", ""]
