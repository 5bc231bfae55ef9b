"""omnistream's kernels, imported as ``omnistream.kernels``: the GPU kernels (Triton) and their
dispatch (``ops``), the native CPU kernels of the LLM (``cpu``, C and assembly built at first
use), and the torch references both are tested against (``reference``).

The repository root is the ``omnistream`` package, so this folder is also reachable as a top-level
``kernels`` whenever the root is on ``sys.path`` (``python -m ...`` or ``python -c`` started from
it). That name belongs to the Hugging Face ``kernels`` package, which transformers imports. When
this file runs under the top-level name, it hands the import over to the installed package (the
first ``kernels`` on ``sys.path`` other than this folder), so nothing started from the repository
root shadows it. Without that package installed, the import fails as it would without this folder.
"""

from __future__ import annotations

if __name__ == "kernels":  # not omnistream.kernels: hand over to the installed package
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def _other_path(entry: str) -> bool:
        try:
            return os.path.abspath(entry or os.getcwd()) != _here
        except OSError:  # a deleted current directory
            return True

    _spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if _other_path(p)])
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (the Hugging Face package; omnistream's own kernels/ folder "
            "is omnistream.kernels)",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise
