"""Overlay tunnels: VXLAN, GENEVE and NVGRE encapsulation and decapsulation."""
