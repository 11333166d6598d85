"""The CUGAN paper's published numbers (CVPRW 2021, Tables 1 and 2), to print beside ours.

Transcribed from the paper text (``shared/seeds/000_*.txt``), with two repairs, both checked
against the paper's own arithmetic:

* Table 2's column headers are garbled in the text: the blur row reads ``0 0 2 4 1 1 2`` (one
  entry lost) and the noise row ``30 50 0 0 15 30 50 50``. The noise row is complete, and the
  two-degradation columns must be settings the paper evaluates; ``(2, 50)`` and ``(4, 50)`` are
  the only ones ending in noise 50 beside ``(0, 50)``, so the eight columns are
  ``(0,30) (0,50) (2,0) (4,0) (1,15) (1,30) (2,50) (4,50)``. Table 2 has no ``(2,30)`` or
  ``(4,30)`` column.
* Table 2's CUnet row prints ``20.07`` and ``28.63`` for ``(2,0)`` and ``(4,0)``; the printed
  PSNR distances (``0.17``, ``0.22`` = Unet minus CUnet) and the Unet row (``30.24``, ``26.85``)
  give ``30.07`` and ``26.63``, which the method doc also lists. We use the repaired values.

Table 1's condition vectors print ``0.15`` for blur 1; ``r / 4`` is ``0.25`` (we use 0.25).

Conventions (the paper does not state them; the method doc and the authors' test code do):
Table 2 is PSNR on RGB on CBSD68; Table 1 is LPIPS (AlexNet) and DISTS on LIVE1, and the
authors' script passes [0, 1] tensors to lpips without ``normalize=True`` -- so their LPIPS
numbers were computed on inputs the network expected in [-1, 1]. Ours use the documented
convention, so the two are not strictly comparable even with the real backbone weights.
Distances: PSNR ``baseline - ours``; LPIPS/DISTS ``ours - baseline``; lower is better.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.condition import setting_key

__all__ = [
    "PAPER_TABLES",
    "TABLE1_DISTS_LIVE1",
    "TABLE1_LIVE1",
    "TABLE2_CBSD68",
    "PaperTable",
]


@dataclass(frozen=True)
class PaperTable:
    """One published table: ``rows[model][setting_key] = value`` for one metric on one set."""

    name: str
    key: str  # short identifier (JSON keys, DVC metrics)
    dataset: str  # our eval-set name: "cbsd68" or "live1"
    metric: str  # our metric name: "psnr_rgb", "lpips" or "dists"
    higher_is_better: bool
    settings: tuple[tuple[float, float], ...]
    rows: dict[str, dict[str, float]]
    # Which of our model kinds the table's "ours" row compares with, and the paper's names.
    kind: str  # "mse" or "gan"
    ours_row: str  # paper's name of the modulation model (CUnet / CUGAN)
    baseline_row: str  # paper's name of the fixed-degradation baseline (Unet / UGAN)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(setting_key(r, s) for r, s in self.settings)


def _rows(settings: tuple[tuple[float, float], ...], **rows: tuple[float, ...]) -> dict:
    out = {}
    for name, values in rows.items():
        if len(values) != len(settings):  # a transcription error: fail at import, loudly
            raise ValueError(f"paper row {name}: {len(values)} values for {len(settings)} settings")
        out[name.replace("_", " ")] = {
            setting_key(r, s): v for (r, s), v in zip(settings, values, strict=True)
        }
    return out


_T1_SETTINGS = (
    (0, 30),
    (0, 50),
    (2, 0),
    (4, 0),
    (1, 15),
    (1, 30),
    (2, 30),
    (2, 50),
    (4, 30),
    (4, 50),
)
_T2_SETTINGS = ((0, 30), (0, 50), (2, 0), (4, 0), (1, 15), (1, 30), (2, 50), (4, 50))

TABLE2_CBSD68 = PaperTable(
    name="Table 2 (PSNR RGB, CBSD68)",
    key="table2_psnr_rgb_cbsd68",
    dataset="cbsd68",
    metric="psnr_rgb",
    higher_is_better=True,
    settings=_T2_SETTINGS,
    rows=_rows(
        _T2_SETTINGS,
        Unet=(30.62, 28.28, 30.24, 26.85, 29.12, 27.41, 24.57, 23.03),
        CUnet=(30.50, 28.16, 30.07, 26.63, 29.04, 27.35, 24.55, 23.02),
        CResMD=(30.43, 28.06, 30.09, 26.53, 29.00, 27.28, 24.48, 22.95),
    ),
    kind="mse",
    ours_row="CUnet",
    baseline_row="Unet",
)

TABLE1_LIVE1 = PaperTable(
    name="Table 1 (LPIPS, LIVE1)",
    key="table1_lpips_live1",
    dataset="live1",
    metric="lpips",
    higher_is_better=False,
    settings=_T1_SETTINGS,
    rows=_rows(
        _T1_SETTINGS,
        UGAN=(0.0490, 0.0957, 0.0484, 0.1331, 0.0697, 0.1140, 0.2068, 0.2557, 0.3154, 0.3510),
        CUGAN=(0.0522, 0.0966, 0.0525, 0.1463, 0.0714, 0.1178, 0.2019, 0.2498, 0.3075, 0.3350),
    ),
    kind="gan",
    ours_row="CUGAN",
    baseline_row="UGAN",
)

TABLE1_DISTS_LIVE1 = PaperTable(
    name="Table 1 (DISTS, LIVE1)",
    key="table1_dists_live1",
    dataset="live1",
    metric="dists",
    higher_is_better=False,
    settings=_T1_SETTINGS,
    rows=_rows(
        _T1_SETTINGS,
        UGAN=(0.0603, 0.0901, 0.0499, 0.1013, 0.0716, 0.0987, 0.1430, 0.1705, 0.1994, 0.2110),
        CUGAN=(0.0639, 0.0964, 0.0525, 0.1081, 0.0727, 0.1003, 0.1392, 0.1657, 0.1982, 0.2162),
    ),
    kind="gan",
    ours_row="CUGAN",
    baseline_row="UGAN",
)

#: Every published table, in the order they are printed.
PAPER_TABLES: tuple[PaperTable, ...] = (TABLE2_CBSD68, TABLE1_LIVE1, TABLE1_DISTS_LIVE1)
