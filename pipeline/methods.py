"""Names of the pseudo-mask methods and polarities, and the foreground limits of a usable pseudo-mask (no imports:
the CLI and configs, prep's and the trainer's, validate against these without loading scikit-image and SciPy;
:mod:`.threshold` implements the methods)."""
from __future__ import annotations

PLAIN_METHODS = ("otsu", "multiotsu", "li", "yen", "triangle")
# Region-aware (issue 6): find the field of view first, then threshold inside it; see threshold.field_of_view().
REGION_METHODS = ("fov_otsu", "fov_otsu_clean", "fov_otsu_hull", "fov_multiotsu_hull")
METHODS = PLAIN_METHODS + REGION_METHODS
POLARITIES = ("auto", "bright", "dark")
# build-masks' --polarity also takes "store": one side for the whole store, the majority of the per-image auto
# decisions over a seeded sample of its inputs (pipeline/store_polarity.py); pseudo_mask() takes POLARITIES only.
STORE_POLARITY = "store"
BUILD_POLARITIES = POLARITIES + (STORE_POLARITY,)


def unknown_method(name: str) -> str:
    """What to tell someone who asked for a method prep does not know."""
    return f"{name!r} is not a method prep knows; choose one of {', '.join(METHODS)}"

# A pseudo-mask whose foreground fraction is outside [FG_LOW, FG_HIGH] is flagged (QC) and degenerate: it is not
# pretrained on. The trainer's self-training rounds use the same limits by default (selftrain.min_fg / max_fg).
FG_LOW = 0.005  # flag "fg_low" below this foreground fraction
FG_HIGH = 0.995  # flag "fg_high" above it


def fg_flags(fg: float) -> tuple[str, ...]:
    """The QC flags of a foreground fraction: ``("fg_low",)``, ``("fg_high",)`` or none."""
    return ("fg_low",) if fg < FG_LOW else ("fg_high",) if fg > FG_HIGH else ()


# Store-level QC, written only by --polarity store (manifests of auto/bright/dark stores are unchanged; see
# docs/pseudo_masks.md "Store-level polarity and implausible coverage" for the measurements behind the numbers).
# FG_IMPLAUSIBLE: 1 of 2,229 real labels of ../shared/data lies above 90% (a PH2 lesion filling the frame, 98%), and
# 13 of the 16 default-method pseudo-masks above it have IoU < 0.3 with their label (mean 0.18): degenerate.
FG_IMPLAUSIBLE = 0.90  # flag "fg_implausible" above this foreground fraction
FG_IMPLAUSIBLE_FLAG = "fg_implausible"
POLARITY_MINORITY = "polarity_minority"  # the image's own auto decision disagrees with the store's polarity
NOT_DEGENERATE_FLAGS = frozenset({POLARITY_MINORITY})  # flags that only inform: the record is still pretrained on


def store_qc_flags(fg: float, own_polarity: str, store_polarity: str, flags=()) -> list[str]:
    """The flags ``--polarity store`` adds to a record that already has ``flags``: ``fg_implausible`` when the
    foreground fraction is above FG_IMPLAUSIBLE (unless ``fg_high`` already says so), ``polarity_minority`` when the
    image's own auto side differs from the store's (not for a constant image: it has no side)."""
    out = []
    if fg > FG_IMPLAUSIBLE and "fg_high" not in flags:
        out.append(FG_IMPLAUSIBLE_FLAG)
    if own_polarity != store_polarity and "constant" not in flags:
        out.append(POLARITY_MINORITY)
    return out


def is_degenerate(flags) -> bool:
    """Whether a record with these QC flags is excluded from pretraining (any flag but the informative ones)."""
    return any(f not in NOT_DEGENERATE_FLAGS for f in flags)
