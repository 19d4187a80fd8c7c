"""quantkit: post-training quantization of causal LMs with Triton kernels."""

__version__ = "0.1.0"
