"""MLflow, in one place: the only package of the pipeline that imports mlflow (besides the
pyfunc model wrapper, pipeline/train/pyfunc.py, which MLflow loads on its own).

* :mod:`~pipeline.tracking.store` -- which store (``$MLFLOW_TRACKING_URI``, else
  ``tracking.uri`` made absolute), its client, the errors that mean "tracking failed",
  experiments (tagged ``mlflow.experimentKind=custom_model_development``), batched writes.
* :mod:`~pipeline.tracking.runs` -- the training stages' parent/child runs and the
  ``tracking.json`` they leave beside a checkpoint; plain runs for evaluation and the sweep.
* :mod:`~pipeline.tracking.journal` -- the files of a local fallback (records, runs.json, what
  a sync replayed); :mod:`~pipeline.tracking.fallback` -- :class:`RunLog`, which keeps
  training going on those files when the server fails; :mod:`~pipeline.tracking.sync` --
  ``sync_run``, which replays them into the server once it is back.
* :mod:`~pipeline.tracking.registry` -- registered versions, aliases, version tags, downloads,
  and :func:`resolve_model_uri` (``models:/NAME/VERSION`` / ``models:/NAME@ALIAS``).

Store: ``sqlite:///mlflow.db`` in the working directory by default, artifacts of new
experiments under ``tracking.artifact_location`` (``./mlartifacts``); ``mlflow ui
--backend-store-uri sqlite:///mlflow.db`` shows it. A local sqlite store is reachable only from
this machine: on a multi-node cluster point MLFLOW_TRACKING_URI at a server.

Import from here; the submodules are the layout, this is the surface. The one exception is
:mod:`pipeline.tracking.sync` (import it from there): what the DVC stages import is a
dependency of theirs, and a change to the replay code must not retrain a model.
"""

from pipeline.tracking.fallback import RunLog
from pipeline.tracking.registry import (
    ModelRegistry,
    ModelUri,
    NotRegistered,
    RegisteredVersion,
    RegistryError,
    is_model_uri,
    parse_model_uri,
    resolve_model_uri,
)
from pipeline.tracking.runs import (
    PARENT_ENV,
    TRACKING_FILE,
    MissingExperiment,
    RunStatus,
    TrackingTarget,
    create_run,
    dvc_lock_tags,
    end_run,
    flatten_params,
    git_tags,
    log_to_run,
    open_stage_run,
    read_tracking_file,
    recorded_run_id,
    start_stage_run,
    write_tracking_file,
)
from pipeline.tracking.store import (
    TRACKING_ERRORS,
    ensure_experiment,
    experiment_id,
    limit_http_retries,
    probe_server,
    resolve_tracking_uri,
)

__all__ = [
    "PARENT_ENV",
    "TRACKING_ERRORS",
    "TRACKING_FILE",
    "MissingExperiment",
    "ModelRegistry",
    "ModelUri",
    "NotRegistered",
    "RegisteredVersion",
    "RegistryError",
    "RunLog",
    "RunStatus",
    "TrackingTarget",
    "create_run",
    "dvc_lock_tags",
    "end_run",
    "ensure_experiment",
    "experiment_id",
    "flatten_params",
    "git_tags",
    "is_model_uri",
    "limit_http_retries",
    "log_to_run",
    "open_stage_run",
    "parse_model_uri",
    "probe_server",
    "read_tracking_file",
    "recorded_run_id",
    "resolve_model_uri",
    "resolve_tracking_uri",
    "start_stage_run",
    "write_tracking_file",
]
