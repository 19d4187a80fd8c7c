"""Quantization algorithms, registered by name (see ``quantkit.algorithms.registry``)."""
