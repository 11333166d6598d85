"""Data stages (prepare -> extract -> shards, and evaluation sets) and the training loader.

Modules are imported explicitly (``from pipeline.data.shards import ...``); nothing is imported
here, so that reading a manifest does not pull in torch.
"""
