"""`microseg classify`: classify ClassBench trace headers against a ClassBench rule file."""

from __future__ import annotations

import sys

import numpy as np

from . import classbench
from .classifier import ALGOS, build


def register(sub) -> None:
    p = sub.add_parser(
        "classify",
        help="first matching rule for each header of a ClassBench trace",
        description="Print, per trace header, the 0-based index of the first "
        "matching rule in the rule file, or -1.",
    )
    p.add_argument("--rules", required=True, help="ClassBench filter file")
    p.add_argument("--trace", required=True, help="trace file: src dst sport dport proto")
    p.add_argument("--algo", default="tss", choices=sorted(ALGOS), help="classifier (default tss)")
    p.set_defaults(func=run)


def run(args) -> int:
    rs = classbench.load_rules(args.rules)
    K = classbench.load_trace(args.trace)
    clf = build(rs, args.algo)
    out = np.empty(0, np.int32)
    if K.shape[0]:
        out = clf.classify_keys(K)
    sys.stdout.write("".join(f"{int(x)}\n" for x in out))
    return 0
