"""The studio's Gradio page: controls, events, the ``/restore`` endpoint, and launching it.

The handlers are thin: they call :mod:`~pipeline.studio.session` (models, z, runs),
:mod:`~pipeline.studio.regions` (inputs, boxes, masks) and :mod:`~pipeline.studio.recipe`
(the CLI command), and turn the project's one-line errors into a line in the page's status box,
so that a bad upload or a model that does not load leaves the server running. Model runs are
triggered on slider *release* (never on every drag step) and share one concurrency group of
limit 1: the CPU runs one restoration at a time and a burst of releases computes only the last.

Gradio is configured for a machine without Internet: no analytics, and the theme uses the
system's fonts (the default theme would fetch web fonts).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch

from pipeline.errors import one_line, os_error_line
from pipeline.imageio import DEFAULT_MAX_PIXELS, ImageError, write_cond_map, write_png
from pipeline.inference import InferenceError
from pipeline.studio.recipe import number, restore_command
from pipeline.studio.regions import (
    StudioImage,
    box_around,
    context_box,
    crop,
    estimate_noise,
    inner,
    painted_mask,
    quantize_z,
    read_image,
    sample_photos,
    z_map,
)
from pipeline.studio.session import ModelSession, ModelSpec

__all__ = ["Studio", "build_app", "launch"]

log = logging.getLogger(__name__)

#: Errors that are the user's input or the machine's limits, not bugs: one line in the page
#: (ImageError, CheckpointError, DNIError, DeviceError and StudioError are ValueErrors).
USER_ERRORS = (ValueError, ImageError, OSError, InferenceError, torch.OutOfMemoryError)
MODEL_RUN = "model"  # concurrency group of every event that runs the network
PREVIEW_SIZE = 256
THEME = {"font": ["ui-sans-serif", "system-ui", "sans-serif"], "font_mono": ["monospace"]}

INTRO = (
    "# CUGAN studio\n"
    "Upload a blurred and/or noisy photo (or pick a sample), set the degradation to remove, "
    "and compare before and after. The preview box (click the input to move it) is recomputed "
    "when a slider is released; **Restore the full image** runs the whole photo exactly as the "
    "CLI command below does."
)
REGION_HELP = (
    "Paint a region (e.g. a flat sky) and give it its own blur and noise: the generator takes "
    "a z per pixel. Both z's are stored in 8 bits (steps of 1/255), as in the condition map "
    "offered for download. The network was trained on one z per image: see "
    "docs/studio-regions.md for what to expect near region borders."
)


def _message(err: BaseException, path: str | None = None, name: str | None = None) -> str:
    """One line; an upload's server-side temporary path is shown as the name the user gave."""
    text = os_error_line(err) if isinstance(err, OSError) else one_line(err)
    return text.replace(path, name or Path(path).name) if path else text


def _error(err: BaseException, path: str | None = None, name: str | None = None) -> str:
    text = _message(err, path, name)
    log.info("studio: %s", text)
    return f"**Error:** {text}"


@dataclass
class _Region:
    """The painted-region inputs of one event."""

    enabled: bool
    editor: Any
    blur: float
    noise: float


class Studio:
    """State shared by every page of one server: the model session, limits, output files."""

    def __init__(self, session: ModelSession, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.session = session
        self.max_pixels = max_pixels
        self._workdir: Path | None = None
        self._swap = threading.Lock()

    def _output_dir(self) -> Path:
        """A fresh folder for one result (Gradio serves files from the temp directory)."""
        with self._swap:
            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="cugan-studio-"))
        folder = self._workdir / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def close(self) -> None:
        """Remove the result files written so far."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # -- inputs -------------------------------------------------------------------------------

    def load(self, path: str | None, name: str | None = None):
        """Read an upload or a sample: (state, ok, input view, editor, noise, cx, cy, status,
        uploader). The uploader is emptied, ready for the next file (the status names this one).
        """
        skip = gr.skip()
        if not path:
            return (skip, False, skip, skip, skip, skip, skip, skip, skip)
        try:
            image = read_image(path, max_pixels=self.max_pixels, name=name)
        except USER_ERRORS as err:
            return (skip, False, skip, skip, skip, skip, skip, _error(err, path, name), None)
        estimate = estimate_noise(image.array, self.session.scale.noise_max)
        noise = gr.update(value=estimate, label=self._noise_label(estimate))
        editor = {"background": image.array, "layers": [], "composite": None}
        notes = "".join(f" Note: {n}." for n in image.notes)
        status = (
            f"Loaded {image.path.name} ({image.width}x{image.height}). Noise level estimated at "
            f"{estimate:g} (scikit-image estimate_sigma; adjust it).{notes}"
        )
        return (
            image,
            True,
            image.array,
            editor,
            noise,
            image.width // 2,
            image.height // 2,
            status,
            None,
        )

    def load_sample(self, name: str | None):
        """A bundled photo; the CLI command names it by its full path (it runs as shown)."""
        path = str(sample_photos()[name]) if name else None
        return self.load(path, name=path)

    def load_selected(self, evt: gr.SelectData):
        """:meth:`load_sample` for the dropdown's ``select`` event, which carries the option
        picked. Not its ``input`` event: Gradio's dropdown sends that twice per pick (on the
        option, then on the blur that closes the list), and the second load rewrites the
        cached picture file that the first one's preview is reading (Gradio writes a cached
        file in place, not atomically): that preview fails on a truncated file and, the
        event being deduplicated, no preview comes at all."""
        return self.load_sample(evt.value)

    def _noise_label(self, estimate: float | None = None) -> str:
        label = f"Noise to remove (std on 0..255, 0..{self.session.scale.noise_max:g})"
        return label if estimate is None else f"{label}, estimated {estimate:g}"

    # -- z -----------------------------------------------------------------------------------

    def z_text(self, blur: float, noise: float, rblur: float, rnoise: float) -> str:
        try:
            z = self.session.z(blur, noise)[0].tolist()
            rz = self.session.z(rblur, rnoise)[0].tolist()
        except ValueError as err:
            return f"z: {_message(err)}"
        return (
            f"z = [{z[0]:.3f}, {z[1]:.3f}] &nbsp; (region: [{rz[0]:.3f}, {rz[1]:.3f}]; "
            f"{self.session.scale.describe()}, the checkpoint's scale)"
        )

    def _zmap(self, image: StudioImage, blur: float, noise: float, region: _Region):
        """uint8 z map for a painted region, or None (no region: the vector z, exactly)."""
        if not region.enabled:
            return None
        mask = painted_mask(region.editor, image.height, image.width)
        if mask is None:
            return None
        outside = quantize_z(self.session.z(blur, noise))
        inside = quantize_z(self.session.z(region.blur, region.noise))
        return z_map(mask, outside, inside)

    def _command(self, image: StudioImage, blur, noise, alpha, cond_map: str | None) -> str:
        session = self.session
        return restore_command(
            input_name=image.name,
            output_name=f"{image.path.stem}_restored.png",
            spec=session.pinned_spec,
            blur=blur,
            noise=noise,
            alpha=alpha if session.has_alpha else None,
            cond_map_name=cond_map,
            device=session.device_name,
            path=session.path,
            tracking_uri=session.tracking_uri,
        )

    # -- runs --------------------------------------------------------------------------------

    def preview(self, image, blur, noise, alpha, cx, cy, size, use_region, editor, rblur, rnoise):
        """The preview box restored: (before/after, command, status)."""
        skip = gr.skip()
        if image is None:
            return skip, skip, "Upload an image or pick a sample photo first."
        region = _Region(bool(use_region), editor, rblur, rnoise)
        try:
            start = time.perf_counter()
            session = self.session
            h, w = image.height, image.width
            box = box_around(
                w // 2 if cx is None else cx,
                h // 2 if cy is None else cy,
                PREVIEW_SIZE if not size else int(size),
                h,
                w,
            )
            ctx = context_box(box, session.context_margin, session.config.size_multiple, h, w)
            zmap = self._zmap(image, blur, noise, region)
            out = session.restore(
                crop(image.array, ctx),
                blur,
                noise,
                alpha,
                zmap=None if zmap is None else crop(zmap, ctx),
                tile=None,
            )
            after = crop(out, inner(box, ctx))
            cond = f"{image.path.stem}_condmap.png" if zmap is not None else None
            command = self._command(image, blur, noise, alpha, cond)
        except USER_ERRORS as err:
            return skip, skip, _error(err)
        what = " with the painted region" if zmap is not None else ""
        status = (
            f"Preview {box.describe()}{what} in {time.perf_counter() - start:.2f} s "
            f"(blur {number(blur)}, noise {number(noise)}"
            + (f", alpha {number(alpha)})." if session.has_alpha else ").")
        )
        return (crop(image.array, box), after), command, status

    def preview_after_load(self, ok, *inputs):
        if not ok:
            skip = gr.skip()
            return skip, skip, skip
        return self.preview(*inputs)

    def full(
        self,
        image,
        blur,
        noise,
        alpha,
        cx,
        cy,
        size,
        use_region,
        editor,
        rblur,
        rnoise,
        progress=gr.Progress(),  # noqa: B008 -- Gradio's documented way to ask for a progress bar
    ):
        """The whole image: (before/after, result file, condition map file, command, status)."""
        skip = gr.skip()
        if image is None:
            return skip, skip, skip, skip, "Upload an image or pick a sample photo first."
        region = _Region(bool(use_region), editor, rblur, rnoise)
        try:
            start = time.perf_counter()
            zmap = self._zmap(image, blur, noise, region)
            progress((0, 1), desc="restoring", unit="tiles")
            out = self.session.restore(
                image.array,
                blur,
                noise,
                alpha,
                zmap=zmap,
                progress=lambda done, total: progress(
                    (done, total), desc="restoring", unit="tiles"
                ),
            )
            folder = self._output_dir()
            result = write_png(folder / f"{image.path.stem}_restored.png", out)
            cond_path = None
            if zmap is not None:
                cond_path = write_cond_map(folder / f"{image.path.stem}_condmap.png", zmap)
            command = self._command(
                image, blur, noise, alpha, cond_path.name if cond_path else None
            )
        except USER_ERRORS as err:
            return skip, skip, skip, skip, _error(err)
        status = (
            f"Restored the full image ({image.width}x{image.height}) in "
            f"{time.perf_counter() - start:.2f} s."
        )
        return (
            (image.array, out),
            str(result),
            str(cond_path) if cond_path else None,
            command,
            status,
        )

    def api_restore(self, image: str | None, blur: float, noise: float, alpha: float) -> np.ndarray:
        """``/restore``: the image restored as ``cugan restore`` would (alpha ignored if single)."""
        if not image:
            raise gr.Error("no image given")
        try:
            loaded = read_image(image, max_pixels=self.max_pixels)
            session = self.session
            return session.restore(
                loaded.array,
                float(blur),
                float(noise),
                float(alpha) if session.has_alpha and alpha is not None else None,
            )
        except USER_ERRORS as err:
            raise gr.Error(_message(err, image)) from None

    # -- models ------------------------------------------------------------------------------

    def load_models(self, model: str, mse: str, gan: str):
        """Swap the session's model(s): (alpha, blur, noise, region blur, region noise, model
        info, status); the old model stays if the new one does not load."""
        skip = gr.skip()
        try:
            spec = ModelSpec(model.strip() or None, mse.strip() or None, gan.strip() or None)
            session = self.session.with_spec(spec)
        except USER_ERRORS as err:
            return skip, skip, skip, skip, skip, skip, _error(err)
        with self._swap:
            self.session = session
        scale = session.scale
        blur = gr.update(maximum=scale.blur_max, label=_blur_label(scale.blur_max))
        noise = gr.update(maximum=scale.noise_max, label=self._noise_label())
        return (
            gr.update(visible=session.has_alpha),
            blur,
            noise,
            gr.update(maximum=scale.blur_max),
            gr.update(maximum=scale.noise_max),
            session.describe(),
            f"Loaded {spec.describe()}.",
        )


def _blur_label(blur_max: float) -> str:
    return f"Blur to remove (Gaussian std in px, 0..{blur_max:g})"


def _point(image: StudioImage | None, evt: gr.SelectData):
    """The clicked pixel of the input view: the new centre of the preview box."""
    if image is None or evt is None or evt.index is None:
        return gr.skip(), gr.skip()
    x, y = evt.index[:2]
    return int(x), int(y)


def build_app(studio: Studio) -> gr.Blocks:
    """The page. Element ids (``#blur``, ``#compare``, ...) are what the browser tests use."""
    s = studio.session
    scale = s.scale
    with gr.Blocks(title="CUGAN studio", analytics_enabled=False) as app:
        image_state = gr.State(None)
        loaded_ok = gr.State(False)
        gr.Markdown(INTRO)
        status = gr.Markdown("Ready: upload an image or pick a sample photo.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1, min_width=340):
                upload = gr.File(
                    label="Upload an image (8-bit PNG, JPEG, ...)",
                    type="filepath",
                    elem_id="upload",
                )
                sample = gr.Dropdown(
                    choices=sorted(sample_photos()),
                    value=None,
                    label="... or a sample photo",
                    elem_id="sample",
                )
                blur = gr.Slider(
                    0,
                    scale.blur_max,
                    value=0,
                    step=0.1,
                    label=_blur_label(scale.blur_max),
                    elem_id="blur",
                )
                noise = gr.Slider(
                    0,
                    scale.noise_max,
                    value=0,
                    step=0.1,
                    label=studio._noise_label(),
                    elem_id="noise",
                )
                alpha = gr.Slider(
                    0,
                    1,
                    value=0.5,
                    step=0.05,
                    visible=s.has_alpha,
                    label="alpha: 0 = GAN model (sharper), 1 = MSE model (smoother)",
                    elem_id="alpha",
                )
                zinfo = gr.Markdown(studio.z_text(0, 0, 0, 0), elem_id="z")
                with gr.Row():
                    cx = gr.Number(label="preview centre x", precision=0, elem_id="cx")
                    cy = gr.Number(label="centre y", precision=0, elem_id="cy")
                    size = gr.Number(
                        PREVIEW_SIZE, label="box size", precision=0, minimum=16, elem_id="size"
                    )
                full = gr.Button("Restore the full image", variant="primary", elem_id="full")
                command = gr.Textbox(
                    label="CLI command (reproduces the full result)",
                    lines=2,
                    interactive=False,
                    buttons=["copy"],
                    elem_id="command",
                )
                download = gr.File(
                    label="Result (PNG)", interactive=False, height=90, elem_id="download"
                )
            with gr.Column(scale=2):
                compare = gr.ImageSlider(
                    label="Before / after",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="compare",
                )
                view = gr.Image(
                    label="Input (click to centre the preview box)",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="input",
                )
        with gr.Accordion("Per-region condition (beyond the paper)", open=False, elem_id="regions"):
            gr.Markdown(REGION_HELP)
            use_region = gr.Checkbox(
                False, label="Give the painted region its own condition", elem_id="use-region"
            )
            with gr.Row():
                rblur = gr.Slider(
                    0, scale.blur_max, value=0, step=0.1, label="Region blur", elem_id="rblur"
                )
                rnoise = gr.Slider(
                    0, scale.noise_max, value=0, step=0.1, label="Region noise", elem_id="rnoise"
                )
            editor = gr.ImageEditor(
                type="numpy",
                image_mode="RGBA",
                sources=(),
                transforms=(),
                layers=False,
                format="png",
                label="Paint the region",
                brush=gr.Brush(colors=["#ff3b30"], color_mode="fixed"),
                elem_id="editor",
            )
            condmap = gr.File(
                label="Condition map (--cond-map: grey = z_blur, alpha = z_noise)",
                interactive=False,
                elem_id="condmap",
            )
        with gr.Accordion("Model", open=False, elem_id="models"):
            info = gr.Markdown(s.describe(), elem_id="model-info")
            with gr.Row():
                m_model = gr.Textbox(s.spec.model or "", label="model", elem_id="m-model")
                m_mse = gr.Textbox(s.spec.mse_model or "", label="MSE model", elem_id="m-mse")
                m_gan = gr.Textbox(s.spec.gan_model or "", label="GAN model", elem_id="m-gan")
            load_models = gr.Button("Load", elem_id="m-load")
        with gr.Row(visible=False):  # the scripting endpoint's own inputs and output
            api_in = [
                gr.File(label="image", type="filepath"),
                gr.Number(label="blur"),
                gr.Number(label="noise"),
                gr.Number(label="alpha", value=1.0),
            ]
            api_out = gr.Image(label="restored", type="numpy", format="png")
            api_go = gr.Button()

        run = {
            "concurrency_limit": 1,
            "concurrency_id": MODEL_RUN,
            "api_visibility": "undocumented",
        }
        ui = {"api_visibility": "undocumented"}
        inputs = [image_state, blur, noise, alpha, cx, cy, size, use_region, editor, rblur, rnoise]
        shown = [compare, command, status]
        loaded = [image_state, loaded_ok, view, editor, noise, cx, cy, status, upload]
        upload.upload(studio.load, upload, loaded, **ui).then(
            studio.preview_after_load, [loaded_ok, *inputs], shown, **run
        )
        sample.select(studio.load_selected, None, loaded, **ui).then(
            studio.preview_after_load, [loaded_ok, *inputs], shown, **run
        )
        view.select(_point, image_state, [cx, cy], **ui).then(studio.preview, inputs, shown, **run)
        for number_box in (cx, cy, size):
            number_box.submit(studio.preview, inputs, shown, **run)
        for slider in (blur, noise, alpha, rblur, rnoise):
            slider.release(studio.preview, inputs, shown, trigger_mode="always_last", **run)
        for control in (blur, noise, rblur, rnoise):
            control.change(studio.z_text, [blur, noise, rblur, rnoise], zinfo, queue=False, **ui)
        use_region.input(studio.preview, inputs, shown, **run)
        editor.input(studio.preview, inputs, shown, trigger_mode="always_last", **run)
        full.click(studio.full, inputs, [compare, download, condmap, command, status], **run)
        load_models.click(
            studio.load_models,
            [m_model, m_mse, m_gan],
            [alpha, blur, noise, rblur, rnoise, info, status],
            **run,
        )
        api_go.click(
            studio.api_restore,
            api_in,
            api_out,
            api_name="restore",
            concurrency_limit=1,
            concurrency_id=MODEL_RUN,
        )
    return app


def launch(
    studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True
) -> gr.Blocks:
    """Serve the page; ``block=False`` returns once the server is up (tests)."""
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        quiet=True,
        show_error=False,
        theme=gr.themes.Default(**THEME),
    )
    return app
