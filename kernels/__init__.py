"""Triton kernels of quantkit (installed as ``quantkit.kernels``); absolute imports only."""
