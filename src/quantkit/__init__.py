"""quantkit: post-training quantization of causal LMs with Triton kernels."""

__version__ = "0.1.0"

# Public functions, imported on first use so that `import quantkit` stays light (no torch).
_LAZY = {
    "save_quantized": "quantkit.serialization",
    "load": "quantkit.serialization",
    "export_compressed_tensors": "quantkit.export",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
