"""Training: the two CUGAN stages (CUnet with MSE, then CUGAN with GAN fine-tuning) on Ray Train.

Modules, in the order data flows through them:

* :mod:`~pipeline.train.schedules` -- pure learning-rate functions of the iteration.
* :mod:`~pipeline.train.losses`    -- perceptual (VGG19-54, L1) and GAN losses.
* :mod:`~pipeline.train.steps`     -- stateless ``mse_step`` / ``gan_step``.
* :mod:`~pipeline.train.state`     -- training checkpoints (safetensors + JSON, never pickle).
* :mod:`~pipeline.train.tensors`   -- a loader over pre-made tensors (tests, benchmark ceiling).
* :mod:`~pipeline.train.validation`-- PSNR per setting and the modulation grid while training.
* :mod:`~pipeline.tracking`  -- MLflow runs, with a local JSONL fallback.
* :mod:`~pipeline.train.loop`      -- ``train_loop_per_worker(config)``, run by Ray on each worker.
* :mod:`~pipeline.train.trainer`   -- checks the config, builds the ``TorchTrainer``, runs a stage.
* :mod:`~pipeline.train.pyfunc`    -- the MLflow pyfunc model (image, z, alpha -> image).

Nothing here is imported eagerly: importing ``pipeline.train`` costs nothing.
"""
