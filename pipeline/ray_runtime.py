"""Connecting to Ray: the configured cluster, or a private local instance -- never a stranger's.

``ray.init()`` without an address attaches to whatever cluster the ``ray_current_cluster`` file
in Ray's temp directory names: a ``ray start`` someone left running, or a stale file after one
was killed (with ``num_cpus`` given that even fails: "When connecting to an existing cluster,
num_cpus and num_gpus must not be provided"). So the rule here is explicit:

* an address is configured (``ray.address`` / ``sweep.ray_address``, else ``$RAY_ADDRESS``):
  connect to it; its token authentication settings come from the environment
  (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``, as ``infra/`` hands them out);
* nothing configured: start a private instance with ``address="local"``. It listens on
  loopback and lives as long as this process, so token authentication is switched off for it
  (``RAY_AUTH_MODE=disabled``, unless the environment says otherwise) instead of generating a
  token file and warning on every start.
"""

from __future__ import annotations

import logging
import os

__all__ = ["cluster_address", "ensure_ray"]

log = logging.getLogger(__name__)


def cluster_address(configured: str | None) -> str | None:
    """The cluster to connect to: the configured address, else ``$RAY_ADDRESS``, else None."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(configured: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to the cluster or start a private local instance; True if this call started Ray.

    Does nothing (returns False) when Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address(configured)
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return True
