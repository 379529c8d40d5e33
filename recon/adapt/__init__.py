"""BiasRecon adaptation: frequency calibration of a prior and the self-supervised k-space loss.

- :mod:`recon.adapt.calibration` — :class:`FrequencyCalibration` (band gains ``γ`` hooked into any
  ``nn.Module``).
- :mod:`recon.adapt.families` — every calibration family (:func:`make_calibration`), its
  :class:`CalibrationShape`, and :class:`CalibratedPrior` (a prior with γ fixed, passed on as a value).
- :mod:`recon.adapt.profiles` — site profiles: γ saved for a site and a prior, and its validated load.
- :mod:`recon.adapt.selfsup` — the Θ/Λ split of the sampled k-space and the held-out loss.
"""

from recon.adapt.calibration import (
    MAX_VARIABLES,
    FrequencyCalibration,
    candidate_layers,
    default_band_edges,
    radial_bands,
)
from recon.adapt.families import FAMILIES, CalibratedPrior, CalibrationShape, make_calibration
from recon.adapt.profiles import SiteProfile, apply_profile, calibrated_prior, load_profile, save_profile
from recon.adapt.selfsup import KSpaceSplit, acs_mask, density_weights, heldout_loss, split_mask, theta_operator
from recon.coils import detect_acs  # the one centre detector, re-exported for the Θ/Λ split's users

__all__ = [
    "MAX_VARIABLES",
    "FAMILIES",
    "FrequencyCalibration",
    "CalibratedPrior",
    "CalibrationShape",
    "make_calibration",
    "SiteProfile",
    "apply_profile",
    "calibrated_prior",
    "candidate_layers",
    "default_band_edges",
    "density_weights",
    "load_profile",
    "radial_bands",
    "save_profile",
    "KSpaceSplit",
    "acs_mask",
    "detect_acs",
    "heldout_loss",
    "split_mask",
    "theta_operator",
]
