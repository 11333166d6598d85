"""The champion rule: a candidate model version takes the registry alias (``champion``) only if
it beats the current holder on the configured metric.

Both versions are scored by the same evaluation (:mod:`pipeline.evaluation`) on the same data
at decision time, so a change of the evaluation set cannot make an old score look better or
worse than it is. The decision, both scores and the reason are written as tags on the
candidate version (``promotion.*``) and logged, whatever the outcome. Every registry call goes
through :class:`pipeline.tracking.ModelRegistry`.

The rule (:func:`decide`), for ``direction`` max (min mirrors it):

* no current champion -> promote;
* candidate is the champion already -> keep (nothing to decide);
* ``candidate > champion + min_delta`` -> promote; anything else, ties included -> refuse;
* a non-finite candidate score -> refuse; a metric computed with random backbone weights ->
  refuse unless the rule allows it (such numbers rank nothing).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params, PromotionRule
from pipeline.evaluation.scoring import evaluate_models
from pipeline.evaluation.specs import ModelSpec
from pipeline.evaluation.terms import PERCEPTUAL
from pipeline.tracking import ModelRegistry, RegistryError

__all__ = [
    "Decision",
    "PromotionError",
    "apply_decision",
    "decide",
    "evaluate_and_promote",
]

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """The registry does not hold what the rule needs (one-line message)."""


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
    if candidate_version is not None and candidate_version == champion_version:
        return verdict(False, "candidate already holds the alias")
    if champion_score is None or not math.isfinite(champion_score):
        return verdict(True, "no scored champion")
    if rule.direction == "max":
        better = candidate_score > champion_score + rule.min_delta
    else:
        better = candidate_score < champion_score - rule.min_delta
    margin = f"min_delta {rule.min_delta:g}" if rule.min_delta else "strictly"
    if better:
        return verdict(True, f"candidate beats champion ({margin}, {rule.direction})")
    return verdict(False, f"candidate does not beat champion ({margin}, {rule.direction})")


# ---------------------------------------------------------------------------------------------
# the registry side (pipeline.tracking.registry)


def apply_decision(
    registry: ModelRegistry, model_name: str, decision: Decision, alias: str
) -> None:
    """Tag the candidate version with the decision and move the alias if it promotes."""
    if decision.candidate_version is None:
        raise PromotionError("a decision without a candidate version cannot be applied")
    registry.set_version_tags(model_name, decision.candidate_version, decision.tags())
    if decision.promote:
        registry.set_alias(model_name, alias, decision.candidate_version)
    log.info("%s: %s", model_name, decision.summary())


# ---------------------------------------------------------------------------------------------
# the whole decision: download, evaluate both on the same data, decide, record


def evaluate_and_promote(
    registry: ModelRegistry,
    rule: PromotionRule,
    *,
    alias: str,
    eval_root: str | os.PathLike[str],
    params: Params,
    workdir: str | os.PathLike[str],
    candidate_version: str | None = None,
) -> Decision | None:
    """Score the candidate (default: the newest version) and the alias holder with the same
    evaluation, decide with :func:`decide`, tag the candidate and move the alias if it wins.

    Returns None when the model has no version yet (nothing to decide). The model kind (hence the
    metrics computed) follows the rule's metric: LPIPS/DISTS -> ``gan``, else ``mse``.
    """
    name = rule.model_name
    if candidate_version is None:
        try:
            latest = registry.latest_version(name)
        except RegistryError:  # kept as it was: an unreadable registry reads as "no version"
            latest = None
        if latest is None:
            log.warning("%s: no registered version: nothing to promote", name)
            return None
        candidate_version = latest.version
    try:
        holder = registry.alias_holder(name, alias)
    except RegistryError:
        # Kept as it was: ANY registry error on the alias reads as "no champion" (a known hole:
        # an erroring registry then promotes without comparison). alias_holder already tells
        # "alias does not exist" (None) from other errors (RegistryError).
        holder = None
    holder_version = holder.version if holder is not None else None
    metric = rule.metric.rsplit("/", 1)[-1]
    kind = "gan" if metric in PERCEPTUAL else "mse"
    versions = [candidate_version] + (
        [holder_version] if holder_version not in (None, candidate_version) else []
    )
    specs = [
        ModelSpec(
            name=f"{name}-v{v}",
            kind=kind,  # type: ignore[arg-type]
            path=registry.download(name, v, Path(workdir) / f"{name}-v{v}", prefer=kind),
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
