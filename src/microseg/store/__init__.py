"""The policy in etcd, for many hosts (format and semantics in docs/store.md).

* :mod:`~microseg.store.layout`: one key per resource under a prefix (default
  ``/microseg/v1/``), values in the policy file's schema, and :func:`assemble`, which validates
  a set of resources exactly as the policy loader validates a file, errors naming keys.
* :mod:`~microseg.store.ops`: :func:`apply_policy` (one guarded transaction, or guarded
  batches and a commit),
  :func:`read_policy`, :func:`publish_status` / :func:`read_status` for the agents.
* :class:`PolicyWatcher`: what one host needs (and only that), watched, judged at commits,
  fail static.
* :class:`StoreClient`: etcd's HTTP/JSON gateway through ``etcd3gw``, with failover.
"""

from .etcd import Compacted, Conflict, StoreClient, StoreError, StoreUnavailable
from .layout import DEFAULT_PREFIX, assemble, canonical, host_keys, policy_resources
from .ops import apply_policy, commit, plan_apply, publish_status, read_policy, read_sa_configs, read_status
from .watch import PolicyWatcher

__all__ = [
    "DEFAULT_PREFIX",
    "Compacted",
    "Conflict",
    "PolicyWatcher",
    "StoreClient",
    "StoreError",
    "StoreUnavailable",
    "apply_policy",
    "assemble",
    "canonical",
    "commit",
    "host_keys",
    "plan_apply",
    "policy_resources",
    "publish_status",
    "read_policy",
    "read_sa_configs",
    "read_status",
]
