"""Evaluation of restoration models on the degraded test sets (paper section 4.2): one
implementation for the DVC ``evaluate`` stage, the Prefect flows, the ablation trials and the
promotion rule.

The modules, each importing only those listed before it:

* :mod:`~pipeline.evaluation.terms` -- model kinds, method roles, size modes, metric names and
  directions, EvalError;
* :mod:`~pipeline.evaluation.specs` -- which methods (ModelSpec, fixed baselines, ReferenceSpec;
  registry URIs) and how a checkpoint is loaded with the z scale it records;
* :mod:`~pipeline.evaluation.sets` -- the test sets on disk (EvalSet) and the size mode;
* :mod:`~pipeline.evaluation.suite` -- the metric callables (MetricSuite);
* :mod:`~pipeline.evaluation.methods` -- how each method restores an image (Method: checkpoint,
  input, BM3D, folder);
* :mod:`~pipeline.evaluation.plan` -- every method and the suite of one evaluation, loaded once
  (EvalPlan), shared by scoring and figures;
* :mod:`~pipeline.evaluation.results` -- ScoreRow, EvalReport and its MetricTable aggregates
  (means, distances, the paper comparison);
* :mod:`~pipeline.evaluation.scoring` -- restore and measure (score_plan, evaluate_models);
* :mod:`~pipeline.evaluation.output` -- metrics/plots files and the printed tables;
* :mod:`~pipeline.evaluation.figures` -- modulation grids, alpha strips, modulation curves;
* :mod:`~pipeline.evaluation.run` -- the stage's whole sequence of steps, and MLflow logging.

Import from the module that owns a name; this file hands nothing on, so that importing a low
module never loads the high ones.
"""
