"""Put this folder first on PYTHONPATH and ``import torch`` / ``import triton`` fail, as on a
laptop that installed only ``pip install -e .``: the subprocess runs as if neither existed."""

import sys
from importlib.abc import MetaPathFinder

BLOCKED = ("torch", "triton")


class _Blocker(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by tests/helpers/without_torch)",
                                      name=fullname)
        return None


sys.meta_path.insert(0, _Blocker())
