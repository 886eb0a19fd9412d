"""Overlay tunnels: VXLAN, GENEVE and NVGRE encapsulation and decapsulation."""
from .tunnel import (DECAP_NAMES, KINDS, DecapResult, decap, encap,  # noqa: F401
                     outer_template)
