"""The datapath as the agent uses it, imported in one place.

The sans-IO datapath (``Datapath``, ``DatapathConfig``, ``BatchResult``, ``Forwarder`` and the
verdict reasons ``REASONS``) lives in :mod:`microseg.datapath`; every module of the agent
imports it from here, so that where it lives is written in one place.
"""

from __future__ import annotations

from ..datapath import REASONS, BatchResult, Datapath, DatapathConfig, Forwarder  # noqa: F401

__all__ = ["REASONS", "BatchResult", "Datapath", "DatapathConfig", "Forwarder"]
