"""``cugan studio``: the subcommand's parser and entry point (registered in pipeline/cli/main.py).

``cugan studio --model M`` or ``cugan studio --mse-model A --gan-model B`` loads the model(s)
first -- a model that does not load is the CLI's one-line error, before any server starts --
and then serves the page on ``--host``/``--port`` until Ctrl-C. Gradio is imported only here,
when the server starts, so that every other ``cugan`` command starts without it.
"""

from __future__ import annotations

import argparse
import logging
import signal

from pipeline.imageio import DEFAULT_MAX_PIXELS
from pipeline.inference import Backend, Precision
from pipeline.studio.session import ModelSession, ModelSpec

__all__ = ["add_parser", "run"]

log = logging.getLogger("cugan")

#: The studio's upload limit: an interactive tool on a CPU (``cugan restore`` allows 40 MP).
STUDIO_MAX_PIXELS = min(16_000_000, DEFAULT_MAX_PIXELS)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {value}")
    return value


def _pixels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_parser(
    subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] | None = None
) -> argparse.ArgumentParser:
    """Add ``studio`` to ``cugan``'s subcommands; ``parents`` carries the shared -v/-q flags."""
    p = subparsers.add_parser(
        "studio",
        parents=parents or [],
        help="interactive web app: sliders for blur, noise and alpha, live preview, regions",
        description=(
            "Serve the CUGAN studio, a local web page to restore photos interactively: blur "
            "and noise sliders (the condition z, on the checkpoint's scale), the MSE<->GAN "
            "blend alpha when two models are given, a before/after comparison, a live preview "
            "box, a painted region with its own condition, and the `cugan restore` command "
            "that reproduces each result. Scripts can call its /restore endpoint with "
            "gradio_client. Give --model, or --mse-model and --gan-model: a checkpoint "
            "directory, a .safetensors file, or a registry URI models:/NAME/VERSION or "
            "models:/NAME@ALIAS (as for cugan restore)."
        ),
    )
    models = p.add_argument_group("model (either --model, or --mse-model and --gan-model)")
    models.add_argument(
        "--model",
        metavar="M",
        help="checkpoint directory, .safetensors file, or registry URI (its GAN generator "
        "where the version has one, else its only one)",
    )
    models.add_argument(
        "--mse-model",
        metavar="M",
        help="MSE (CUnet) checkpoint, alpha 1; a registry URI: that version's mse generator",
    )
    models.add_argument(
        "--gan-model",
        metavar="M",
        help="GAN (CUGAN) checkpoint, alpha 0; a registry URI: that version's gan generator",
    )
    models.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store of registry URIs (default: $MLFLOW_TRACKING_URI, else tracking.uri "
        "of ./params.yaml)",
    )
    serve = p.add_argument_group("server")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    serve.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    serve.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where to run (default: auto = cuda when available)",
    )
    serve.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        default=Backend.AUTO.value,
        help="inference path, as for cugan restore; auto (default) = the fastest exact one "
        "measured here for a long-lived service, chosen once; the CLI command states it",
    )
    serve.add_argument(
        "--precision",
        choices=[p.value for p in Precision],
        default=Precision.AUTO.value,
        help="fp32 or bf16, as for cugan restore (default auto)",
    )
    serve.add_argument(
        "--max-pixels",
        type=_pixels,
        default=STUDIO_MAX_PIXELS,
        metavar="N",
        help=f"refuse larger uploads (default {STUDIO_MAX_PIXELS:,})",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the model(s) (errors end the command with one line), then serve until Ctrl-C."""
    spec = ModelSpec(args.model, args.mse_model, args.gan_model)
    session = ModelSession(
        spec,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        tracking_uri=args.tracking_uri,
    )

    from pipeline.studio.ui import Studio, launch  # Gradio: only when a server starts

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up self-checks
    # SIGTERM (``kill``, a service manager) stops the server like Ctrl-C: Gradio's wait loop
    # closes it on KeyboardInterrupt, and the result files are removed below.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    studio = Studio(session, max_pixels=args.max_pixels)
    try:
        log.info("studio: serving on http://%s:%d (Ctrl-C stops it)", args.host, args.port)
        launch(studio, host=args.host, port=args.port, block=True)
    finally:
        studio.close()
        signal.signal(signal.SIGTERM, previous)
    log.info("studio: stopped")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
