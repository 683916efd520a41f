"""Names of the pseudo-mask methods and polarities (no imports: the CLI and configs validate against these
without loading scikit-image and SciPy; :mod:`.threshold` implements them)."""
from __future__ import annotations

PLAIN_METHODS = ("otsu", "multiotsu", "li", "yen", "triangle")
# Region-aware (issue 6): find the field of view first, then threshold inside it; see threshold.field_of_view().
REGION_METHODS = ("fov_otsu", "fov_otsu_clean", "fov_otsu_hull", "fov_multiotsu_hull")
METHODS = PLAIN_METHODS + REGION_METHODS
POLARITIES = ("auto", "bright", "dark")
