"""The kernel fast path: an XDP program for offloaded flows, its loader and its model."""

from .loader import (
    BpfError,
    FlowAction,
    FlowKey,
    FlowStats,
    KernelFastPath,
    clock_ns,
    vxlan_template,
)

__all__ = ["BpfError", "FlowAction", "FlowKey", "FlowStats", "KernelFastPath", "clock_ns", "vxlan_template"]
