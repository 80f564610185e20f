"""Triton kernels, installed as ``otlabel.kernels``. Importing this package never imports Triton."""
