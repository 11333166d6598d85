"""Evaluation of restoration models on the degraded test sets (paper section 4.2): one
implementation for the DVC ``evaluate`` stage, the Prefect flows, the ablation trials and the
promotion rule.

The modules, each importing only those listed before it:

* :mod:`~pipeline.evaluation.terms` -- model kinds, metric names and directions, EvalError;
* :mod:`~pipeline.evaluation.specs` -- which models (ModelSpec, baselines) and how each is
  loaded with the z scale its checkpoint records;
* :mod:`~pipeline.evaluation.sets` -- the test sets on disk (EvalSet);
* :mod:`~pipeline.evaluation.suite` -- the metric callables (MetricSuite);
* :mod:`~pipeline.evaluation.results` -- ScoreRow, EvalReport and its MetricTable aggregates
  (means, distances, the paper comparison);
* :mod:`~pipeline.evaluation.scoring` -- restore and measure (evaluate_models);
* :mod:`~pipeline.evaluation.output` -- metrics/plots files and the printed tables;
* :mod:`~pipeline.evaluation.figures` -- modulation grids, alpha strips, modulation curves;
* :mod:`~pipeline.evaluation.run` -- the stage's whole sequence of steps, and MLflow logging.

Import from the module that owns a name; this file hands nothing on, so that importing a low
module never loads the high ones.
"""
