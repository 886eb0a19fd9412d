"""Overlay tunnels: VXLAN, GENEVE and NVGRE encapsulation and decapsulation."""

from .tunnel import (
    DECAP_NAMES,
    KINDS,
    DecapResult,
    decap,
    encap,
    outer_template,
)

__all__ = ["DECAP_NAMES", "KINDS", "DecapResult", "decap", "encap", "outer_template"]
