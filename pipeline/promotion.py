"""The champion rule: the model version a training run registered takes the registry alias
(``champion``) only if it beats the current holder on the configured metric.

The candidate is the EXACT version the training stage registered, read from the
``tracking.json`` it left beside its checkpoint (:func:`registered_candidate`): never "the newest
version", which after a failed or local-only registration would be an old model judged as new.
A run that registered nothing stops the promotion loudly.

Both versions are scored by the same evaluation (:mod:`pipeline.evaluation`) on the same data
at decision time, so a change of the evaluation set cannot make an old score look better or
worse than it is. The rule names the generator it scores (``kind``: a ``cugan`` version also
carries the CUnet it started from; a rule on PSNR with ``kind: gan`` scores the GAN one). The
decision, both scores and the reason are written as tags on the candidate version
(``promotion.*``) and logged, whatever the outcome. Every registry call goes through
:class:`pipeline.tracking.ModelRegistry`.

Aliases: the candidate holds ``challenger`` while it is judged (and after a refusal); a
promotion moves the champion alias to it and gives the replaced champion ``previous``, which
:func:`rollback` (``cugan registry rollback NAME``) moves the champion back to.

Registry failures: only "the alias does not exist" (:meth:`ModelRegistry.alias_holder` answers
None) means "no champion". Any other error (unreachable server, 5xx, a bad answer) is a
:class:`~pipeline.tracking.RegistryError` that propagates: the flow run fails in one line and
nothing is promoted.

The rule (:func:`decide`), for ``direction`` max (min mirrors it):

* a non-finite score on EITHER side -> refuse (a NaN champion proves nothing about the
  candidate); a metric computed with random backbone weights -> refuse unless the rule allows
  it (such numbers rank nothing);
* candidate is the champion already -> keep (nothing to decide);
* no current champion -> promote;
* ``candidate > champion + min_delta`` -> promote; anything else, ties included -> refuse.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params, PromotionRule
from pipeline.evaluation.scoring import evaluate_models
from pipeline.evaluation.specs import ModelSpec
from pipeline.tracking import TRACKING_FILE, ModelRegistry, NotRegistered, read_tracking_file

__all__ = [
    "CHALLENGER",
    "PREVIOUS",
    "Decision",
    "PromotionError",
    "Rollback",
    "apply_decision",
    "decide",
    "evaluate_and_promote",
    "registered_candidate",
    "rollback",
]

log = logging.getLogger(__name__)

#: The alias of the version under judgement, and of the champion a promotion replaced.
CHALLENGER = "challenger"
PREVIOUS = "previous"


class PromotionError(RuntimeError):
    """The registry or the training run does not hold what the rule needs (one-line message)."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    direction: str
    candidate_score: float
    champion_score: float | None
    candidate_version: str | None = None
    champion_version: str | None = None

    def tags(self) -> dict[str, str]:
        """The ``promotion.*`` tags recorded on the candidate version."""
        return {
            "promotion.decision": "promoted" if self.promote else "rejected",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.direction": self.direction,
            "promotion.candidate_score": _num(self.candidate_score),
            "promotion.champion_score": _num(self.champion_score),
            "promotion.champion_version": self.champion_version or "none",
        }

    def summary(self) -> str:
        verdict = "PROMOTE" if self.promote else "keep champion"
        return (
            f"{verdict}: {self.metric} ({self.direction}) candidate v{self.candidate_version} = "
            f"{_num(self.candidate_score)}, champion v{self.champion_version or '-'} = "
            f"{_num(self.champion_score)}; {self.reason}"
        )


def _num(v: float | None) -> str:
    return "none" if v is None else f"{v:.6g}"


def decide(
    candidate_score: float,
    champion_score: float | None,
    rule: PromotionRule,
    *,
    random_backbones: bool = False,
    candidate_version: str | None = None,
    champion_version: str | None = None,
) -> Decision:
    """Apply the champion rule (module docstring) to two scores."""

    def verdict(promote: bool, reason: str) -> Decision:
        return Decision(
            promote,
            reason,
            rule.metric,
            rule.direction,
            candidate_score,
            champion_score,
            candidate_version,
            champion_version,
        )

    if random_backbones and not rule.allow_random_backbones:
        return verdict(
            False,
            f"{rule.metric} was computed with random backbone weights: not "
            "meaningful (set allow_random_backbones to decide on it anyway)",
        )
    if not math.isfinite(candidate_score):
        return verdict(False, f"candidate score is not finite ({candidate_score})")
    if champion_score is not None and not math.isfinite(champion_score):
        return verdict(False, f"champion score is not finite ({champion_score}): cannot compare")
    if candidate_version is not None and candidate_version == champion_version:
        return verdict(False, "candidate already holds the alias")
    if champion_score is None:
        return verdict(True, "no champion")
    if rule.direction == "max":
        better = candidate_score > champion_score + rule.min_delta
    else:
        better = candidate_score < champion_score - rule.min_delta
    margin = f"min_delta {rule.min_delta:g}" if rule.min_delta else "strictly"
    if better:
        return verdict(True, f"candidate beats champion ({margin}, {rule.direction})")
    return verdict(False, f"candidate does not beat champion ({margin}, {rule.direction})")


# ---------------------------------------------------------------------------------------------
# the candidate: what the training run registered


def registered_candidate(
    registry: ModelRegistry, rule: PromotionRule, model_dir: str | os.PathLike[str]
) -> str:
    """The version of ``rule.model_name`` that the training run in ``model_dir`` registered
    (its ``tracking.json``, as :func:`pipeline.tracking.read_tracking_file` reads it: after a
    ``cugan tracking sync``, the synced registration), checked to exist in ``registry``.

    :class:`PromotionError` (one line) where the run registered nothing, registered another
    name, or registered into another store; registry failures propagate as RegistryError.
    """
    name, where = rule.model_name, Path(model_dir)
    record = read_tracking_file(where)
    if record is None:
        raise PromotionError(f"{name}: no {TRACKING_FILE} in {where}: no training run to judge")
    registered = record.get("registered_model")
    if not registered:
        if record.get("mode") == "local":
            how = (
                "logged to local files (MLflow was unreachable); `cugan tracking sync "
                f"{where.parent}` registers it once the server is back"
            )
        else:
            how = "registered no model (tracking.log_model/register_model off, or it failed)"
        raise PromotionError(f"{name}: the training run in {where} {how}: nothing to judge")
    if registered.get("name") != name:
        raise PromotionError(
            f"{name}: the training run in {where} registered {registered.get('name')!r}, "
            f"not {name!r} (retrain.rules model_dir)"
        )
    recorded_uri = str(record.get("tracking_uri") or "").rstrip("/")
    if recorded_uri and recorded_uri != registry.tracking_uri.rstrip("/"):
        raise PromotionError(
            f"{name}: the training run in {where} registered into {recorded_uri}, "
            f"not into {registry.tracking_uri}"
        )
    version = str(registered.get("version"))
    try:
        registry.version(name, version)
    except NotRegistered as err:
        raise PromotionError(
            f"{name}: the version the training run registered is gone: {err}"
        ) from None
    return version


# ---------------------------------------------------------------------------------------------
# the registry side (pipeline.tracking.registry)


def apply_decision(
    registry: ModelRegistry,
    model_name: str,
    decision: Decision,
    alias: str,
) -> None:
    """Tag the candidate version with the decision; if it promotes, the replaced champion takes
    ``previous``, the candidate the alias, and ``challenger`` is cleared."""
    candidate = decision.candidate_version
    if candidate is None:
        raise PromotionError("a decision without a candidate version cannot be applied")
    registry.set_version_tags(model_name, candidate, decision.tags())
    if decision.promote:
        if decision.champion_version is not None:
            registry.set_alias(model_name, PREVIOUS, decision.champion_version)
        registry.set_alias(model_name, alias, candidate)
        holder = registry.alias_holder(model_name, CHALLENGER)
        if holder is not None and holder.version == candidate:
            registry.delete_alias(model_name, CHALLENGER)
    log.info("%s: %s", model_name, decision.summary())


@dataclass(frozen=True)
class Rollback:
    name: str
    alias: str
    restored: str
    demoted: str | None

    def summary(self) -> str:
        was = f"from v{self.demoted} " if self.demoted else ""
        return (
            f"{self.name}: {self.alias} moved {was}back to v{self.restored} (the previous "
            f"{self.alias}); the {PREVIOUS!r} alias is cleared"
        )


def rollback(registry: ModelRegistry, name: str, alias: str = "champion") -> Rollback:
    """Move ``alias`` back to the version holding ``previous`` and clear ``previous`` (a second
    rollback then has nothing to go back to). The demoted version is tagged
    ``promotion.rolled_back``. PromotionError (one line) when there is no previous version."""
    previous = registry.alias_holder(name, PREVIOUS)
    if previous is None:
        raise PromotionError(
            f"{name}: no {PREVIOUS!r} alias: nothing to roll back to (a promotion sets it)"
        )
    holder = registry.alias_holder(name, alias)
    registry.set_alias(name, alias, previous.version)
    registry.delete_alias(name, PREVIOUS)
    if holder is not None and holder.version != previous.version:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        registry.set_version_tags(name, holder.version, {"promotion.rolled_back": stamp})
    return Rollback(name, alias, previous.version, holder.version if holder else None)


# ---------------------------------------------------------------------------------------------
# the whole decision: download, evaluate both on the same data, decide, record


def evaluate_and_promote(
    registry: ModelRegistry,
    rule: PromotionRule,
    *,
    candidate_version: str,
    alias: str,
    eval_root: str | os.PathLike[str],
    params: Params,
    workdir: str | os.PathLike[str],
) -> Decision:
    """Score ``candidate_version`` (:func:`registered_candidate`) and the alias holder with the
    same evaluation (the generator ``rule.kind`` names, in both), decide with :func:`decide`,
    tag the candidate and move the aliases (:func:`apply_decision`).

    The alias look-up comes first: a registry that cannot answer it raises RegistryError
    before anything is evaluated or moved.
    """
    name = rule.model_name
    metric = rule.metric.rsplit("/", 1)[-1]
    scored = params.evaluate.gan_metrics if rule.kind == "gan" else params.evaluate.mse_metrics
    if metric not in scored:
        raise PromotionError(
            f"{name}: {rule.kind} models are scored with evaluate.{rule.kind}_metrics "
            f"{list(scored)}, which lack {metric!r} (retrain.rules metric)"
        )
    holder = registry.alias_holder(name, alias)  # None only where the alias does not exist
    holder_version = holder.version if holder is not None else None
    if holder_version != candidate_version:
        registry.set_alias(name, CHALLENGER, candidate_version)
    versions = [candidate_version] + (
        [holder_version] if holder_version not in (None, candidate_version) else []
    )
    specs = [
        ModelSpec(
            name=f"{name}-v{v}",
            kind=rule.kind,
            path=registry.download(
                name, v, Path(workdir) / f"{name}-v{v}", prefer=rule.kind, strict=True
            ),
        )
        for v in versions
    ]
    report = evaluate_models(specs, eval_root, params, progress=False)
    cand_score = report.score(specs[0].name, rule.metric)
    if holder_version is None:
        holder_score = None
    else:
        holder_score = report.score(f"{name}-v{holder_version}", rule.metric)
    decision = decide(
        cand_score,
        holder_score,
        rule,
        random_backbones=report.random.get(metric, False),
        candidate_version=candidate_version,
        champion_version=holder_version,
    )
    apply_decision(registry, name, decision, alias)
    return decision
