"""The decision on the built-in data centre's generated traffic agrees with the generator's
ground truth, which is derived from the scenario (not from this code)."""

import numpy as np
import pytest

from microseg.io.generator import generate, load_policy
from microseg.packet.parse import parse
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy


@pytest.mark.parametrize("tunnel", ["vxlan", "geneve", "nvgre"])
def test_generated_traffic_matches_ground_truth(tunnel):
    p = load_policy()
    g = generate(p, flows=200, seed=5, tunnel=tunnel)
    t = g.truth
    v, _, why = compile_policy(p).decide(parse(g.batch), t.ct)
    assert (v == t.verdict).all(), np.flatnonzero(v != t.verdict)[:10]
    causes = np.array([t.causes[c] for c in t.cause])
    names = np.array([V.reason_name(r) for r in why])
    assert (causes == names).all()
    # the traffic exercises allows and several kinds of drop
    assert {"policy", "established", "egress_denied", "ct_invalid", "spoofed_source"} <= set(names)
