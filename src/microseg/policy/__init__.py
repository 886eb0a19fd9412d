"""Policy as data: tenants, workloads, security groups, network policies, compiler.

* :func:`load_policy` / :func:`parse_policy`: the YAML format of ``docs/policy.md``, validated
  with ``file:line: field`` errors (:class:`~microseg.policy.source.PolicyError`).
* :func:`compile_policy` -> :class:`CompiledPolicy`: immutable, versioned; ``decide(keys,
  ct_state)`` gives (verdict, rule index, reason) per packet.
* :class:`PolicyHolder`: the live policy, swapped in one assignment.
* :func:`revoked_connections`: which tracked connections a new policy forbids.
* :class:`Reference` and :func:`explain`: the per-packet decision in plain Python.
"""

from .compiler import CompiledPolicy, PolicyHolder, compile_policy, revoked_connections
from .model import Policy, load_policy, parse_policy
from .reference import Reference, explain

__all__ = [
    "CompiledPolicy",
    "Policy",
    "PolicyHolder",
    "Reference",
    "compile_policy",
    "explain",
    "load_policy",
    "parse_policy",
    "revoked_connections",
]
