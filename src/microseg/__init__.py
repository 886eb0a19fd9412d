"""microseg: a zero-trust micro-segmentation datapath on batches through compiled kernels."""

import os as _os

__version__ = "0.1.0"


def _use_kernel_cache() -> None:
    """Point Numba's cache at a folder named after the package's code (see ``kernelcache``).
    Done before any kernel is defined; a NUMBA_CACHE_DIR the user set is kept."""
    if _os.environ.get("NUMBA_CACHE_DIR"):
        return
    from .kernelcache import prepare

    where = prepare(_os.path.dirname(_os.path.abspath(__file__)))
    if where is None:
        return  # nowhere writable: Numba's own default
    _os.environ["NUMBA_CACHE_DIR"] = where
    import sys

    if "numba" in sys.modules:  # imported before us: its config has read the environment
        from numba.core import config

        setattr(config, "CACHE_DIR", where)  # noqa: B010 - not in its stubs


_use_kernel_cache()
