"""Inspection hand-off and the finite fast-path offload table."""
