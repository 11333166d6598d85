"""Deep network interpolation (DNI) between the MSE model (CUnet) and the GAN model (CUGAN).

``theta = (1 - alpha) * theta_GAN + alpha * theta_MSE`` over every entry of the state dict:
all parameters of G and of its condition network C_G (the paper interpolates both, unlike the
original DNI) and any persistent buffers. alpha = 0 is the GAN model, alpha = 1 the MSE model.

Exactness: at alpha 0 and 1 the tensors of that model are returned unchanged (as copies), so
the two models are reproduced bit for bit rather than up to the rounding of ``0 * a + 1 * b``.
Between them the formula above is evaluated literally, in float32 at least (half-precision
tensors are blended in float32 and cast back); at alpha = 0.5 it equals ``(gan + mse) / 2``
bit for bit, since halving is exact in floating point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from models.generator import Generator, GeneratorConfig

__all__ = [
    "DNIError",
    "blend_generators",
    "check_alpha",
    "config_difference",
    "interpolate_state_dicts",
]


class DNIError(ValueError):
    """The two models cannot be interpolated (one-line message)."""


def check_alpha(alpha: float, *, name: str = "alpha") -> float:
    """``alpha`` as a float in [0, 1], or DNIError: the one statement of the rule.

    Callers that validate user input before loading any weights (the CLI, the studio) call this
    early; :func:`interpolate_state_dicts` calls it again on its own input. ``name`` is how the
    caller's user knows the value (``--alpha`` on the command line); only the message uses it.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise DNIError(f"{name} must be a number in [0, 1] (got {alpha!r})")
    alpha = float(alpha)
    if math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
        raise DNIError(f"{name} must be in [0, 1] (got {alpha:g})")
    return alpha


def config_difference(mse: GeneratorConfig, gan: GeneratorConfig) -> str:
    """``channels_per_scale: [4, 8, 8] vs [4, 8, 16]``: the fields two configs disagree on."""
    a, b = mse.to_dict(), gan.to_dict()
    return "; ".join(f"{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k]) or "no difference"


def _check_compatible(mse: Mapping[str, Tensor], gan: Mapping[str, Tensor]) -> None:
    only_mse = sorted(set(mse) - set(gan))
    only_gan = sorted(set(gan) - set(mse))
    if only_mse or only_gan:
        raise DNIError(
            f"state dicts differ in keys: only in MSE model {only_mse[:6]}, "
            f"only in GAN model {only_gan[:6]} ({len(only_mse)} and {len(only_gan)} in all)"
        )
    for key in mse:
        a, b = mse[key], gan[key]
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise DNIError(f"{key}: both entries must be tensors")
        if a.shape != b.shape:
            raise DNIError(f"{key}: shape {list(a.shape)} (MSE) != {list(b.shape)} (GAN)")
        if a.dtype != b.dtype:
            raise DNIError(f"{key}: dtype {a.dtype} (MSE) != {b.dtype} (GAN)")
        if a.device != b.device:
            raise DNIError(f"{key}: device {a.device} (MSE) != {b.device} (GAN)")


def _blend(mse: Tensor, gan: Tensor, alpha: float, key: str) -> Tensor:
    if not mse.is_floating_point():
        # Integer buffers (e.g. counters) cannot be blended; require them to agree.
        if not torch.equal(mse, gan):
            raise DNIError(f"{key}: non-floating tensors differ between the models")
        return mse.clone()
    work = torch.promote_types(mse.dtype, torch.float32)
    out = (1.0 - alpha) * gan.to(work) + alpha * mse.to(work)
    return out.to(mse.dtype)


def interpolate_state_dicts(
    mse: Mapping[str, Tensor], gan: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """``(1 - alpha) * gan + alpha * mse`` per entry; alpha 1 = MSE model, 0 = GAN model.

    Keys, shapes, dtypes and devices must match. Returns new tensors (detached copies at the
    ends, so the result never aliases the inputs).
    """
    alpha = check_alpha(alpha)
    _check_compatible(mse, gan)
    with torch.no_grad():
        if alpha == 1.0:
            return {k: v.detach().clone() for k, v in mse.items()}
        if alpha == 0.0:
            return {k: gan[k].detach().clone() for k in mse}
        return {k: _blend(mse[k].detach(), gan[k].detach(), alpha, k) for k in mse}


def blend_generators(mse_model: Generator, gan_model: Generator, alpha: float) -> Generator:
    """A new Generator whose G and C_G are the DNI blend of two models with the same config."""
    if mse_model.config != gan_model.config:
        raise DNIError(
            "the generator configs differ (MSE vs GAN: "
            f"{config_difference(mse_model.config, gan_model.config)})"
        )
    blended = interpolate_state_dicts(mse_model.state_dict(), gan_model.state_dict(), alpha)
    # Built on the meta device and filled by assignment: no throw-away random init, and the
    # result lives where the inputs do (a slider in a UI calls this often).
    model = Generator(mse_model.config, device="meta")
    model.load_state_dict(blended, strict=True, assign=True)
    return model.eval()
