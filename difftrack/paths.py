"""Where notebooks and scripts write: ``figures/``, ``results/``, ``cache/`` of the project checkout.

The root is ``$DIFFTRACK_ROOT`` if set, else the nearest parent of the working directory holding ``pyproject.toml``
(notebooks run with ``--cwd notebooks``), else the working directory.
"""
from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    env = os.environ.get("DIFFTRACK_ROOT")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").exists() and (p / "difftrack").is_dir():
            return p
    return here


def _dir(name: str) -> Path:
    d = repo_root() / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir() -> Path:
    return _dir("figures")


def results_dir() -> Path:
    return _dir("results")


def cache_dir(sub: str = "") -> Path:
    return _dir(f"cache/{sub}" if sub else "cache")
