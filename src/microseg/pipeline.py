"""The datapath's former module name: everything lives in :mod:`microseg.datapath`."""
from .datapath import *  # noqa: F401,F403
from .datapath import __all__  # noqa: F401
