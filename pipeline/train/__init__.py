"""Training: the two CUGAN stages (CUnet with MSE, then CUGAN with GAN fine-tuning) on Ray Train.

Modules in the order they build on each other (each imports only modules listed before it):

* :mod:`~pipeline.train.schedules`     -- pure learning-rate functions of the iteration.
* :mod:`~pipeline.train.losses`        -- perceptual (VGG19-54, L1) and GAN losses.
* :mod:`~pipeline.train.steps`         -- stateless ``mse_step`` / ``gan_step``.
* :mod:`~pipeline.train.state`         -- training checkpoints (safetensors + JSON, never pickle).
* :mod:`~pipeline.train.tensors`       -- a loader over pre-made tensors (tests, benchmark ceiling).
* :mod:`~pipeline.train.validation`    -- PSNR per setting and the modulation grid while training.
* :mod:`~pipeline.train.pyfunc`        -- the MLflow pyfunc model (image, z, alpha -> image).
* :mod:`~pipeline.train.worker_config` -- ``WorkerConfig``: the typed, versioned config of a worker.
* :mod:`~pipeline.train.session`       -- ``Session``: ``RaySession`` in Ray, ``LocalSession`` without.
* :mod:`~pipeline.train.testing`       -- the test seam: ``TestHooks`` (fault injection, synthetic data).
* :mod:`~pipeline.train.setup`         -- a worker's networks, weights, optimisers, loader, streams.
* :mod:`~pipeline.train.loop`          -- ``train_loop_per_worker`` / ``run_worker``: the iterations.
* :mod:`~pipeline.train.trainer`       -- checks the config, builds the ``TorchTrainer``, runs a stage.

MLflow itself lives in :mod:`pipeline.tracking`; the loader contract in :mod:`pipeline.data.batch`.
Nothing here is imported eagerly: importing ``pipeline.train`` costs nothing.
"""
