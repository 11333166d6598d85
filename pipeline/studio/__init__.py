"""``cugan studio``: a local web app for interactive modulation (blur, noise, alpha, regions).

Modules, each below the next in the import order:

* :mod:`pipeline.studio.session` -- the model(s) behind the page: loading a model spec (the one
  place a model name is resolved), the checkpoint's z scale, the DNI blends cached per alpha,
  and every model run, which goes through :func:`pipeline.inference.restore`.
* :mod:`pipeline.studio.regions` -- the image side: reading an upload with the CLI's checks,
  the noise estimate, the preview box and its context margin, the painted mask and the z map.
* :mod:`pipeline.studio.recipe` -- the ``cugan restore`` command that reproduces a result.
* :mod:`pipeline.studio.ui` -- the Gradio page and its event handlers (thin: they call the
  three modules above and turn their errors into one line in the page).
* :mod:`pipeline.studio.command` -- the ``cugan studio`` subcommand (parser and entry point).

Only :mod:`~pipeline.studio.ui` and :mod:`~pipeline.studio.command` (when it starts the
server) import Gradio, so the CLI and the tests of the logic do not pay for it.
"""
