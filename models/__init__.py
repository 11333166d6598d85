"""Networks of CUGAN: generator (+ C_G), discriminator (+ C_D), VGG19 features, DNI, registry.

Import the submodules directly (``from models.registry import build_generator``); this package
file does no work at import time.
"""
