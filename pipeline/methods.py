"""Names of the pseudo-mask methods and polarities, and the foreground limits of a usable pseudo-mask (no imports:
the CLI and configs, prep's and the trainer's, validate against these without loading scikit-image and SciPy;
:mod:`.threshold` implements the methods)."""
from __future__ import annotations

PLAIN_METHODS = ("otsu", "multiotsu", "li", "yen", "triangle")
# Region-aware (issue 6): find the field of view first, then threshold inside it; see threshold.field_of_view().
REGION_METHODS = ("fov_otsu", "fov_otsu_clean", "fov_otsu_hull", "fov_multiotsu_hull")
METHODS = PLAIN_METHODS + REGION_METHODS
POLARITIES = ("auto", "bright", "dark")


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
