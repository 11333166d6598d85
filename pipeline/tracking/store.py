"""The MLflow tracking store: which one (its URI), how to reach it (the client), which errors
mean that it failed, its experiments, and batched writes into a run.

The ground floor of :mod:`pipeline.tracking`: runs, the local fallback and the registry build on
it, and nothing outside the package builds an ``MlflowClient`` of its own.

Experiments: every experiment this module creates carries ``mlflow.experimentKind =
custom_model_development``. Without that tag the MLflow 3 UI guesses the kind and opens an
experiment that holds no traces in its GenAI *traces* view, one click away from the runs; with
it, the runs table (the model-training view) opens first. An existing experiment found without
the tag (or with only a value the UI inferred) gets it set; a kind someone chose by hand stays.

A dead server: MLflow's HTTP client retries every request with backoff for about four minutes
by default. :func:`probe_server` asks once with a short timeout before a long run, and
:func:`limit_http_retries` bounds every later request of the process (and of the Ray workers,
which inherit the ``MLFLOW_HTTP_REQUEST_*`` variables) to seconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import requests
from google.protobuf.json_format import ParseError
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from pipeline.config import TrackingParams
from pipeline.errors import one_line

__all__ = [
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "TRACKING_ERRORS",
    "MetricRows",
    "ensure_experiment",
    "experiment_id",
    "is_http",
    "limit_http_retries",
    "probe_server",
    "quiet_client_chatter",
    "quiet_retry_warnings",
    "resolve_tracking_uri",
    "send_batch",
    "tracking_client",
]

#: What a failed tracking call may raise: server unreachable, HTTP errors, store errors, and
#: a reply that is no JSON (MLflow lets that escape raw) or not the message it expects.
TRACKING_ERRORS: tuple[type[BaseException], ...] = (
    MlflowException,
    requests.RequestException,
    OSError,
    json.JSONDecodeError,
    ParseError,
)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Kinds the MLflow UI writes when it guesses: not a person's choice, so ours replaces them.
_INFERRED_KINDS = ("no_inferred_type",)

#: MLflow's per-request limits (log_batch): values per batch and characters per param value.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS, _MAX_PARAM_CHARS = 1000, 100, 100, 6000

#: Metrics to log: ``{key: value}`` (step 0) or rows of ``(step, {key: value})``.
MetricRows = Mapping[str, float] | Iterable[tuple[int, Mapping[str, float]]]


def resolve_tracking_uri(params: TrackingParams, cwd: str | os.PathLike[str] | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else ``params.uri``, with a relative sqlite/file path made absolute
    (Ray workers do not run in this directory)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.uri
    base = Path(cwd) if cwd is not None else Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:  # a plain directory: MLflow's file store
        return (base / uri).resolve().as_uri()
    return uri


def tracking_client(uri: str | None) -> MlflowClient:
    """The client of one store. Always with an explicit URI: ``mlflow.set_tracking_uri`` would
    export MLFLOW_TRACKING_URI to every later subprocess (Ray workers included)."""
    quiet_client_chatter()
    return MlflowClient(tracking_uri=uri)


def quiet_client_chatter() -> None:
    """Keep MLflow's client chatter out of the logs people read (the ``dvc repro`` log): a
    progress bar per artifact download, a run link printed to stdout per run it ends, INFO
    lines such as "Validating input example against model signature". Only defaults: the
    environment variables a person set (``MLFLOW_LOGGING_LEVEL`` among them) win."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # MLflow's own setting (it imports at INFO)
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:"))


def is_http(uri: str | None) -> bool:
    """A tracking server (as opposed to a database or directory this process opens itself)."""
    return str(uri or "").startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------
# a server that does not answer


#: Seconds between MLflow's HTTP retries grow as ``factor * 2**n``; 1 keeps them to seconds.
_BACKOFF_FACTOR = 1


def limit_http_retries(params: TrackingParams, uri: str | None) -> dict[str, str]:
    """Bound MLflow's HTTP requests of this process to ``params.http_timeout_s`` per attempt and
    ``params.http_max_retries`` retries a second or two apart, where the environment does not
    set ``MLFLOW_HTTP_REQUEST_*`` already (a person's choice wins). The variables live in
    ``os.environ`` because that is where MLflow reads them, at every request, and from where
    the training driver hands them to its Ray workers. urllib3's warning at every retry is
    silenced (the caller warns once, with the final error). Returns the values in force;
    nothing changes for a store that is not a server."""
    if not is_http(uri):
        return {}
    quiet_retry_warnings()
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(params.http_timeout_s),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(params.http_max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(_BACKOFF_FACTOR),
    }
    return {name: os.environ.setdefault(name, value) for name, value in wanted.items()}


def quiet_retry_warnings() -> None:
    """urllib3 warns at every retry of a request; the caller's one warning after the last (the
    tracking fallback's) says all of it. For the processes that log to a server."""
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _tls_verify() -> bool | str:
    """The TLS verification MLflow's own client would use (its two settings for it)."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


def probe_server(uri: str, timeout: float) -> str | None:
    """None when the tracking server at ``uri`` answers within ``timeout`` seconds, else why
    not (one line). One request, no retries: this is the short question asked before a long
    run. Any answer below 500 counts (even 401/404: something is there); 5xx means the server
    is there but cannot serve. Stores that are not servers are not probed."""
    if not is_http(uri):
        return None
    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, verify=_tls_verify())
    except requests.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.RequestException as err:
        return f"unreachable ({type(err).__name__}: {one_line(err, limit=200)})"
    if answer.status_code >= 500:
        return f"it answers HTTP {answer.status_code} ({one_line(answer.text or 'no body')})"
    return None


def _tag_kind(client: MlflowClient, experiment: Any) -> None:
    kind = (experiment.tags or {}).get(EXPERIMENT_KIND_TAG)
    if kind is None or kind.endswith("_inferred") or kind in _INFERRED_KINDS:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def experiment_id(uri: str, name: str) -> str | None:
    """The id of experiment ``name``, or None where the store has none of that name."""
    exp = tracking_client(uri).get_experiment_by_name(name)
    return None if exp is None else str(exp.experiment_id)


def ensure_experiment(
    uri: str, name: str, *, artifact_location: str | os.PathLike[str] | None = None
) -> str:
    """The id of experiment ``name``, created if needed, tagged as a model-training experiment
    (module docstring). ``artifact_location`` roots the artifacts of a new experiment in a local
    (sqlite/file) store, as the training stages do; a server chooses its own."""
    return _ensure_experiment(tracking_client(uri), name, uri, artifact_location)


def _ensure_experiment(
    client: MlflowClient,
    name: str,
    uri: str,
    artifact_location: str | os.PathLike[str] | None,
) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        _tag_kind(client, exp)
        return str(exp.experiment_id)
    location = None
    if artifact_location is not None and _is_local(uri):
        location = Path(artifact_location).resolve().as_uri()
    return str(
        client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    )


def _metric_rows(metrics: MetricRows) -> list[tuple[int, dict[str, float]]]:
    if isinstance(metrics, Mapping):
        return [(0, {k: float(v) for k, v in metrics.items()})]
    return [(int(step), {k: float(v) for k, v in m.items()}) for step, m in metrics]


def send_batch(
    client: MlflowClient,
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: MetricRows | None = None,
    tags: Mapping[str, Any] | None = None,
    timestamp_ms: int | None = None,
) -> None:
    """Params, metrics and tags into one run, in batches within MLflow's request limits (param
    values cut to its 6000 characters). Metrics are stamped ``timestamp_ms`` (default: now)."""
    items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in (params or {}).items()]
    for i in range(0, len(items), _MAX_PARAMS):
        client.log_batch(run_id, params=items[i : i + _MAX_PARAMS])
    now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    values = [
        Metric(k, v, now, step) for step, row in _metric_rows(metrics or {}) for k, v in row.items()
    ]
    for i in range(0, len(values), _MAX_METRICS):
        client.log_batch(run_id, metrics=values[i : i + _MAX_METRICS])
    labels = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(labels), _MAX_TAGS):
        client.log_batch(run_id, tags=labels[i : i + _MAX_TAGS])
