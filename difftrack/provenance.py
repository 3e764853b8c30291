"""Where a measurement came from: the code's commit and the device, for the JSON files scripts write."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(short: bool = False, root: str | Path = ROOT) -> str:
    """The commit of the code that runs: ``$GIT_COMMIT`` when set (copied working trees, whose ``.git`` may be
    missing or stale), else ``git rev-parse HEAD`` with ``-dirty`` when tracked files under ``difftrack/``,
    ``scripts/`` or ``bench/`` differ from it, else ``"unknown"``."""
    env = os.environ.get("GIT_COMMIT")
    if env:
        return env[:7] if short else env
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "difftrack", "scripts",
                                "bench"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return (head[:7] if short else head) + ("-dirty" if dirty else "")


def device_name(device: str = "cpu") -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, else the CPU's model and core count."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
