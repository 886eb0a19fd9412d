"""microseg: a zero-trust micro-segmentation datapath on batches through compiled kernels."""

__version__ = "0.1.0"
