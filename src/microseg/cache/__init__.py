"""Exact-match and megaflow caches in front of the slow path."""
