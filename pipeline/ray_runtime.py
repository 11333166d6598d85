"""Connecting to Ray: the configured cluster, or a private local instance -- never a stranger's.

``ray.init()`` without an address attaches to whatever cluster the ``ray_current_cluster`` file
in Ray's temp directory names: a ``ray start`` someone left running, or a stale file after one
was killed (with ``num_cpus`` given that even fails: "When connecting to an existing cluster,
num_cpus and num_gpus must not be provided"). So the rule here is explicit:

* an address is configured (``ray.address`` / ``sweep.ray_address``, else ``$RAY_ADDRESS``):
  connect to it. Its token authentication comes from the environment the cluster's operator
  hands out -- ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (or ``RAY_AUTH_TOKEN``):
  ``infra/local/env.sh`` for the local two-node stack, a Kubernetes secret for KubeRay
  (docs/runbook.md). Nothing here invents or weakens it;
* nothing configured: start a private instance with ``address="local"``. It listens on
  loopback and lives as long as this process, so token authentication is switched off for it
  (``RAY_AUTH_MODE=disabled``, unless the environment says otherwise) instead of generating a
  token file and warning on every start; and Ray Train's preemption watcher, which watches for
  nodes being drained (spot instances), is off on this one machine.

Either way the job's worker processes run :func:`setup_worker_process` first (Ray's
``worker_process_setup_hook``). Ray Train's PlacementGroupCleaner actor polls the State API
every second for the whole run. The State API client finds "the" cluster from ``RAY_ADDRESS``,
else by listing the machine's Ray processes, so with a second Ray instance on the machine the
cleaner's thread dies with "Found multiple active Ray instances" (seen here with other
people's test runs): the hook points ``RAY_ADDRESS`` at the worker's own cluster. And without
a Ray dashboard (the private instance and the local stack start none; the State API lives in
it) every poll logs the same "Failed to query ... actor state" warning: the hook drops that
one message and nothing else.
"""

from __future__ import annotations

import logging
import os

__all__ = ["LOCAL_INSTANCE_ENV", "cluster_address", "ensure_ray", "setup_worker_process"]

log = logging.getLogger(__name__)

#: Environment defaults of a private local instance (set only where the caller has not):
#: inherited by its raylet and so by every worker, controller and actor of it.
LOCAL_INSTANCE_ENV = {
    # loopback only, this process's lifetime: no token (else Ray writes ~/.ray/auth_token,
    # which then switches every later `ray start --head` of the user to token mode)
    "RAY_AUTH_MODE": "disabled",
    # nothing drains a node of a one-machine instance; the watcher actor only adds a
    # core_worker error line per run (ray #53727: constructor arguments in the object store)
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

#: (logger, message prefix) of Ray's own log records that repeat for a whole run and tell an
#: operator nothing they can act on. Everything else those loggers say still gets through
#: (e.g. the cleaner's "controller actor is dead, cleaning up placement group").
_REPEATING = (
    (
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        "Failed to query Ray Train Controller actor state",
    ),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def setup_worker_process() -> None:
    """Ray worker-process setup hook: State API look-ups resolve this worker's own cluster, and
    Ray's repeating no-news warnings (``_REPEATING``) are dropped.

    Ray runs it once in every worker process of the job, after the worker connected and before
    any task or actor code, so it also reaches the detached actors Ray Train starts itself.
    Idempotent.
    """
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    for name, prefix in _REPEATING:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))


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
    runtime_env = {"worker_process_setup_hook": setup_worker_process}
    address = cluster_address(configured)
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env)
    else:
        for key, value in LOCAL_INSTANCE_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env
        )
    return True
