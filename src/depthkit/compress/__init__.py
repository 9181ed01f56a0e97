"""Depth compression: `depthkit.compress(model, method=..., ratio=...)` and its registered methods.

`depthkit.compress` is both this package and the function users call, so the package module is
made callable (calling it runs `api.compress`): `depthkit.compress(model, ...)` then works
whichever of the two an import left behind on the `depthkit` namespace.
"""

import sys
import types

from depthkit.compress import methods  # noqa: F401 - registers the built-in methods
from depthkit.compress.api import CompressionReport, compress, list_methods, save_compressed
from depthkit.compress.base import CompressionMethod, CompressionOutcome, get_method, register_method
from depthkit.compress.plan import CompressionPlan

__all__ = [
    "CompressionMethod",
    "CompressionOutcome",
    "CompressionPlan",
    "CompressionReport",
    "compress",
    "get_method",
    "list_methods",
    "register_method",
    "save_compressed",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
