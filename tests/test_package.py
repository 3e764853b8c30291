"""The package index matches the modules on disk, and every listed submodule imports."""
import importlib
import re
from pathlib import Path

import difftrack

PKG = Path(difftrack.__file__).parent


def test_index_names_exactly_the_modules_on_disk():
    on_disk = ({p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
               | {p.parent.name for p in PKG.glob("*/__init__.py")})  # sub-packages (backbones)
    assert set(difftrack._SUBMODULES) == on_disk
    documented = set(re.findall(r"``difftrack\.(\w+)``", difftrack.__doc__))
    assert documented == on_disk, (on_disk - documented, documented - on_disk)


def test_every_submodule_imports_lazily():
    for name in difftrack._SUBMODULES:
        assert getattr(difftrack, name) is importlib.import_module(f"difftrack.{name}")
    try:
        difftrack.metrics  # noqa: B018
    except AttributeError as e:
        assert "metrics" in str(e)
    else:
        raise AssertionError("difftrack.metrics should not exist")
