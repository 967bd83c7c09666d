"""Makes a Python process behave as if some packages were not installed: with this folder on PYTHONPATH, ``site``
runs this module at start-up, before the program's first import, and the top-level modules named in
EDGE_TEST_ABSENT_MODULES (comma-separated) then fail to import with ModuleNotFoundError, as absent ones do.

tests/test_boundary.py runs the console scripts this way to show what `pip install .` without extras gives.
"""
import os
import sys
from importlib.abc import MetaPathFinder

ABSENT = frozenset(filter(None, os.environ.get("EDGE_TEST_ABSENT_MODULES", "").split(",")))


class Absent(MetaPathFinder):
    """First on sys.meta_path: refuses the absent modules before any real finder looks for them."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


_loaded = sorted(ABSENT & {name.partition(".")[0] for name in sys.modules})
if _loaded:
    raise SystemExit(f"{__file__}: {', '.join(_loaded)} were imported before they could be made absent")
sys.meta_path.insert(0, Absent())
