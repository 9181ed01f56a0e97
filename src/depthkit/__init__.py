"""depthkit: make transformers cheaper by working on their depth."""

__version__ = "0.1.0"

# The public API is imported lazily so that `import depthkit` stays cheap (no torch, no transformers).
_LAZY = {"compress": "depthkit.compress", "save_compressed": "depthkit.compress",
         "CompressionReport": "depthkit.compress", "CompressionPlan": "depthkit.compress",
         "list_methods": "depthkit.compress"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        # `depthkit.compress` is the (callable) package itself; the others are its attributes.
        return module if name == "compress" else getattr(module, name)
    raise AttributeError(f"module 'depthkit' has no attribute '{name}'")
