"""The kernel fast path's offload limits, without a kernel: the insert-rate token bucket and
the capacity, each refusal counted and the refused connection offered again later (the live
behaviour is in tests/test_lab_offload.py)."""

from __future__ import annotations

import types

import numpy as np

from microseg.agent import kfast
from microseg.agent.kfast import KernelOffload, OffloadConfig


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _offloader(monkeypatch, **cfg):
    clock = _Clock()
    monkeypatch.setattr(kfast.time, "monotonic", clock)
    ko = KernelOffload(types.SimpleNamespace(), OffloadConfig(**cfg))
    return ko, clock


def test_rate_bucket_allows_a_burst_of_one_second_then_refills(monkeypatch):
    ko, clock = _offloader(monkeypatch, insert_rate=3.0)
    assert [ko._take_token() for _ in range(5)] == [True, True, True, False, False]
    clock.t += 0.5  # 1.5 tokens back
    assert [ko._take_token() for _ in range(3)] == [True, False, False]
    clock.t += 10  # never more than a second's worth
    assert sum(ko._take_token() for _ in range(10)) == 3


class _FakeMap:
    def __init__(self):
        self.flows = {}

    def install(self, key, action):
        self.flows[key] = action

    def remove(self, key):
        return self.flows.pop(key, None) and None


def test_offload_respects_capacity_and_rate_and_counts_refusals(monkeypatch):
    ko, clock = _offloader(monkeypatch, insert_rate=2.0, capacity=3, after_packets=1)
    ko.fp = _FakeMap()
    ents = np.zeros(
        16, dtype=[("tcp_flags", np.uint8, (2,)), ("bytes", np.uint64, (2,)), ("tcp_state", np.uint8)]
    )
    ents["tcp_state"] = kfast.TCP_ESTABLISHED
    table = types.SimpleNamespace(ents=ents, lookup=lambda b, k: (np.arange(len(b)), np.zeros(len(b), bool)))
    ko.agent = types.SimpleNamespace(dp=types.SimpleNamespace(conntrack=table))
    monkeypatch.setattr(ko, "_plan", lambda res, i, ident: [(("key", ident), "action", 0)])
    monkeypatch.setattr(kfast, "_subset_keys", lambda keys, rows: keys)
    batch = types.SimpleNamespace(select=lambda rows: list(rows))

    def ready(idents):
        return [(i, ident) for i, ident in enumerate(idents)]

    idents = [(7, 6, 0, i, 0, 99, 40000 + i, 80) for i in range(6)]
    ko._offload(batch, types.SimpleNamespace(keys=None), ready(idents[:4]))
    # two tokens: two offloaded, two refused by the rate, their count reset to be offered again
    assert len(ko.flows) == 2 and ko.counters["refused_rate"] == 2
    assert ko._count[idents[2]] == 0 and ko._count[idents[3]] == 0
    # BE_LIBERAL on the offloaded entries both ways (conntrack no longer sees their packets)
    assert (ents["tcp_flags"][:2] & kfast.CK.BE_LIBERAL).all() and not ents["tcp_flags"][2:].any()
    clock.t += 5
    ko._offload(batch, types.SimpleNamespace(keys=None), ready(idents[2:6]))
    # capacity 3: one more fits, the rest are refused for capacity
    assert len(ko.flows) == 3 and ko.counters["refused_capacity"] == 3
    assert ko.counters["offloaded"] == 3
