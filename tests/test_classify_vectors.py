"""Every classifier gives the brute-force first-match answer on the ClassBench vector sets."""

import os

import numpy as np
import pytest

from microseg.classify import build
from microseg.classify.classbench import load_rules, load_trace, load_trace_tuples

VEC = os.path.join(os.path.dirname(__file__), "vectors", "classbench")
SETS = [f"{f}_{n}" for n in (1000, 10000) for f in ("acl", "fw", "ipc")]


def brute_force(rules_path, T):
    """Independent reading of the filter text: first rule whose five fields all match."""
    rows = []
    for line in open(rules_path):
        t = line.replace("@", "").split()
        if not t:
            continue
        (s, sl), (d, dl) = (x.split("/") for x in t[:2])
        ip = lambda a: int.from_bytes(bytes(int(o) for o in a.split(".")), "big")  # noqa: E731
        sm = (0xFFFFFFFF << (32 - int(sl))) & 0xFFFFFFFF
        dm = (0xFFFFFFFF << (32 - int(dl))) & 0xFFFFFFFF
        pv, pm = (int(x, 16) for x in t[8].split("/"))
        rows.append((ip(s) & sm, sm, ip(d) & dm, dm, int(t[2]), int(t[4]), int(t[5]), int(t[7]), pv, pm))
    R = np.array(rows, np.int64)
    out = np.full(len(T), -1, np.int64)
    for s in range(0, len(T), 256):
        t = T[s : s + 256]
        ok = (t[:, None, 0] & R[None, :, 1]) == R[None, :, 0]
        ok &= (t[:, None, 1] & R[None, :, 3]) == R[None, :, 2]
        ok &= (R[None, :, 4] <= t[:, None, 2]) & (t[:, None, 2] <= R[None, :, 5])
        ok &= (R[None, :, 6] <= t[:, None, 3]) & (t[:, None, 3] <= R[None, :, 7])
        ok &= (t[:, None, 4] & R[None, :, 9]) == R[None, :, 8]
        out[s : s + 256] = np.where(ok.any(1), ok.argmax(1), -1)
    return out


@pytest.mark.parametrize("name", SETS)
def test_classbench_sets(name):
    rules, trace = os.path.join(VEC, name + ".rules"), os.path.join(VEC, name + ".trace")
    n = 2000 if name.endswith("10000") else 6000
    T = load_trace_tuples(trace, n)
    want = brute_force(rules, T)
    assert (want >= 0).any() and (want == -1).any()
    rs = load_rules(rules)
    K = load_trace(trace, n)
    for algo in ("linear", "tss", "tree"):
        got = build(rs, algo).classify_keys(K)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want, err_msg=f"{algo} on {name}")


def test_tree_whole_trace_matches_tss():
    rs = load_rules(os.path.join(VEC, "fw_10000.rules"))
    K = load_trace(os.path.join(VEC, "fw_10000.trace"))
    np.testing.assert_array_equal(build(rs, "tree").classify_keys(K), build(rs, "tss").classify_keys(K))
