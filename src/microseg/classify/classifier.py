"""One interface over the classifier algorithms (see the package docstring)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from . import keys as _keys
from .linear import classify_linear
from .rules import NW, RuleSet
from .tree import DecisionTree
from .tss import TupleSpace


class Classifier:
    """A classifier bound to one immutable :class:`RuleSet`."""

    algo = "?"

    def __init__(self, ruleset: RuleSet, impl=None):
        self.ruleset = ruleset
        self.impl = impl

    @property
    def version(self) -> int:
        return self.ruleset.version

    def classify_keys(self, K: np.ndarray) -> np.ndarray:
        """Best rule index (int32, -1 none) for each row of packet keys ``K`` (n, NW)."""
        K = np.asarray(K)
        if K.ndim != 2 or K.shape[1] != NW:
            raise InputError(f"packet keys must have shape (n, {NW}), not {K.shape}")
        return self.impl.classify_keys(np.ascontiguousarray(K, np.uint64))

    def classify(self, keys, ct_state=None, in_port=None) -> np.ndarray:
        """Best rule index per packet of a parsed batch's FlowKeys."""
        return self.classify_keys(_keys.from_flowkeys(keys, ct_state, in_port))

    def nbytes(self) -> int:
        return int(self.impl.nbytes())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} algo={self.algo} rules={len(self.ruleset)} v{self.version}>"


class _Linear:
    def __init__(self, rs):
        self.rs = rs

    def classify_keys(self, K):
        return classify_linear(self.rs, K)

    def nbytes(self):
        return self.rs.nbytes()


def _linear(rs, **kw):
    c = Classifier(rs, _Linear(rs))
    c.algo = "linear"
    return c


def _tss(rs, **kw):
    c = Classifier(rs, TupleSpace(rs))
    c.algo = "tss"
    return c


def _tree(rs, **kw):
    c = Classifier(rs, DecisionTree(rs, **kw))
    c.algo = "tree"
    return c


ALGOS = {"tree": _tree, "tss": _tss, "linear": _linear}


def build(ruleset: RuleSet, algo: str = "tree", **params) -> Classifier:
    """Compile ``ruleset`` for lookups with ``algo`` (one of ``ALGOS``)."""
    if not isinstance(ruleset, RuleSet):
        raise InputError("build() needs a RuleSet")
    try:
        maker = ALGOS[algo]
    except KeyError:
        raise InputError(f"unknown classifier {algo!r} (choose from {', '.join(ALGOS)})") from None
    return maker(ruleset, **params)
