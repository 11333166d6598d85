"""The ``evaluate`` stage before and after a change, in one run: time, and the same numbers.

    .venv/bin/python benchmarks/evaluate.py --before 795b874 --evalsets data/evalsets \\
        --json bench-results/evaluate.json

``--before REV`` is a git revision of this repository (e.g. the commit before the evaluation
speed-up); its ``pipeline/``, ``stages/`` and ``models/`` are exported with ``git archive`` into
a temporary directory. "After" is this working tree. For each of the two, in a fresh
subprocess (imports and model loading count, as in ``dvc repro``):

* ``stage``: ``python -m stages.evaluate`` on ``--evalsets`` with the ``--model`` specs (default:
  the DVC stage's two), ``--no-mlflow`` (the store is not the subject), figures included unless
  ``--no-figures``. The after stage also scores the references (the degraded input always), so
  it does MORE work than the before stage; the rows say what each scored.
* ``score``: :func:`pipeline.evaluation.scoring.evaluate_models` on the same models only -- the
  same work in both revisions (the after one adds no reference unless asked).

Each after run has its own user cache directory (``$CUGAN_CACHE_DIR``) holding only the
inference path measurements of the user's cache (``inference-paths.json``; in a ``dvc repro``
the training stages' validation measured them already): no scores
(:mod:`pipeline.evaluation.score_cache`), so ``stage`` and ``score`` compute every pair.
``--reruns`` adds two more after-stage runs:

* ``stage_retrained``: the models' weights changed, the evaluation sets did not (what every
  ``dvc repro`` after a retraining runs). The cache is primed first by a stage run on copies of
  the models with perturbed weights (same configs, other restorations), so the input's scores
  and the path measurements are there and the models' are not;
* ``stage_unchanged``: the same models again (``dvc repro -f evaluate``, the evaluation flow on
  registered models, a promotion that re-scores the champion): every pair from the cache.

Each rerun's ``metrics.json`` must equal the first one's bitwise (``reruns_identical``).

Reported per run: wall seconds and CPU seconds of the subprocess (CPU time is the fairer figure
on a shared machine, wall time the one a user waits). The numbers: every ``means`` value that
both stages' ``metrics.json`` hold is compared bitwise (JSON keeps a float's every digit), and
``identical`` says whether all were equal; ``differences`` lists any that are not.

Timing happens here, never in tests; figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("cunet:mse:runs/train_cunet/model", "cugan:gan:runs/train_cugan/model")

#: Runs evaluate_models on the model specs only, in the revision on PYTHONPATH.
_SCORE_DRIVER = """
import sys
from pipeline.config import load_params
from pipeline.evaluation.scoring import evaluate_models
from pipeline.evaluation.specs import parse_model_spec
params, root, *specs = sys.argv[1:]
evaluate_models([parse_model_spec(s) for s in specs], root, load_params(params), progress=False)
"""


def export_revision(rev: str, dst: Path) -> Path:
    """``pipeline/``, ``stages/`` and ``models/`` of ``rev`` under ``dst`` (git archive)."""
    dst.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "pipeline", "stages", "models"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    return dst


def timed(
    cmd: list[str], code_root: Path, log: Path, env: dict[str, str] | None = None
) -> dict[str, float]:
    """Run ``cmd`` with ``code_root`` first on PYTHONPATH (``python -P``: the working directory,
    which may hold another revision's packages, is not put first) and ``env`` added; wall and
    CPU seconds."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(code_root)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as fp:
        proc = subprocess.run(cmd, env=env, stdout=fp, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n" + "\n".join(tail))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


_PERTURB_DRIVER = """
import sys, torch
from pipeline.checkpoint import load_checkpoint, save_generator
src, dst = sys.argv[1:]
g = load_checkpoint(src)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in g.model.parameters():
        p.add_(1e-3 * torch.randn(p.shape, generator=gen))
save_generator(dst, g.model, metadata={**g.metadata, "benchmark": "perturbed copy"}, scale=g.scale)
"""


def path_cache(dst: Path) -> Path:
    """A user cache directory holding only the user's inference path measurements (if any)."""
    from pipeline.inference.choice import cache_file  # torch: only when measuring

    dst.mkdir(parents=True, exist_ok=True)
    if cache_file().is_file():
        shutil.copy2(cache_file(), dst / cache_file().name)
    return dst


def perturbed_models(models: list[str], work: Path, code_root: Path) -> list[str]:
    """Copies of the model specs' checkpoints with slightly perturbed weights (same configs)."""
    out = []
    for spec in models:
        name, kind, path = spec.split(":", 2)
        dst = work / f"perturbed-{name}"
        cmd = [sys.executable, "-P", "-c", _PERTURB_DRIVER, path, str(dst)]
        env = {**os.environ, "PYTHONPATH": str(code_root)}
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        out.append(f"{name}:{kind}:{dst}")
    return out


def compare_means(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Every (method, set, setting, metric) both hold: equal bitwise, else listed."""
    diffs, n = [], 0
    for method, per_set in before.items():
        for set_name, per_setting in per_set.items():
            for setting, scores in per_setting.items():
                for metric, value in scores.items():
                    other = after.get(method, {}).get(set_name, {}).get(setting, {}).get(metric)
                    if other is None:
                        continue
                    n += 1
                    if other != value:
                        key = f"{method}/{set_name}/{setting}/{metric}"
                        diffs.append({"key": key, "before": value, "after": other})
    return {"identical": n > 0 and not diffs, "compared_values": n, "differences": diffs}


def _stage_cmd(args: argparse.Namespace, models: list[str], out: Path) -> list[str]:
    cmd = [sys.executable, "-P", "-m", "stages.evaluate", "--params", args.params]
    cmd += ["--evalsets", args.evalsets, "--out", str(out), "--no-mlflow"]
    cmd += [a for m in models for a in ("--model", m)]
    return cmd + (["--no-figures"] if args.no_figures else [])


def _reruns(
    args: argparse.Namespace,
    models: list[str],
    work: Path,
    cache: dict[str, str],
    means: dict[str, Any],
) -> dict[str, Any]:
    """The after stage after a retraining (cache primed by perturbed copies of the models) and
    with unchanged models; both on the first after run's cache, both compared bitwise with it."""
    env = {"CUGAN_CACHE_DIR": str(path_cache(work / "retrained-cache"))}
    prime = perturbed_models(models, work, REPO)
    timed(_stage_cmd(args, prime, work / "prime-out"), REPO, work / "prime.log", env)
    rows: dict[str, Any] = {}
    same = True
    for part, run_env in (("stage_retrained", env), ("stage_unchanged", cache)):
        out = work / f"{part}-out"
        rows[part] = timed(_stage_cmd(args, models, out), REPO, work / f"{part}.log", run_env)
        same = same and json.loads((out / "metrics.json").read_text())["means"] == means
    rows["reruns_identical"] = same
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare with (e.g. main)")
    ap.add_argument("--evalsets", required=True, help="output of the evalsets stage")
    ap.add_argument("--model", action="append", default=None, metavar="NAME:KIND:PATH")
    ap.add_argument("--params", default="params.yaml", help="valid for BOTH revisions")
    ap.add_argument("--no-figures", action="store_true", help="skip the modulation figures")
    ap.add_argument("--skip-score", action="store_true", help="time the stages only")
    ap.add_argument(
        "--reruns",
        action="store_true",
        help="also time the after stage rerun after a retraining and with unchanged models",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--workdir", type=Path, default=None, help="keep outputs here (else temp)")
    args = ap.parse_args(argv)
    models = args.model or list(DEFAULT_MODELS)

    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        work = args.workdir or Path(tmp)
        trees = {"before": export_revision(args.before, work / "before-code"), "after": REPO}
        results: dict[str, Any] = {"before_rev": args.before, "models": models}
        cache = {"CUGAN_CACHE_DIR": str(path_cache(work / "after-cache"))}
        for label, tree in trees.items():
            env = cache if label == "after" else None
            out = work / f"{label}-out"
            row: dict[str, Any] = {
                "stage": timed(
                    _stage_cmd(args, models, out), tree, work / f"{label}-stage.log", env
                )
            }
            means = json.loads((out / "metrics.json").read_text())["means"]
            row["stage"]["methods"] = sorted(means)
            if not args.skip_score:
                score = [sys.executable, "-P", "-c", _SCORE_DRIVER, args.params, args.evalsets]
                if label == "after":  # no scores from the stage's run
                    env = {"CUGAN_CACHE_DIR": str(path_cache(work / "score-cache"))}
                row["score"] = timed(score + models, tree, work / f"{label}-score.log", env)
            results[label] = {**row, "means": means}
        if args.reruns:
            results["after"].update(_reruns(args, models, work, cache, results["after"]["means"]))
        results.update(compare_means(results["before"].pop("means"), results["after"].pop("means")))
        for part in ("stage", "score", "stage_retrained", "stage_unchanged"):
            if part in results["after"]:
                b, a = results["before"][part.split("_")[0]], results["after"][part]
                results[f"speedup_{part}"] = {
                    k: round(b[k] / a[k], 2) for k in ("wall_s", "cpu_s") if a[k] > 0
                }
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["identical"] and results["after"].get("reruns_identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
