"""BiasRecon adaptation: frequency calibration of a prior and the self-supervised k-space loss.

- :mod:`recon.adapt.calibration` — :class:`FrequencyCalibration` (band gains ``γ`` hooked into any
  ``nn.Module``) and site profiles.
- :mod:`recon.adapt.selfsup` — the Θ/Λ split of the sampled k-space and the held-out loss.
"""

from recon.adapt.calibration import (
    MAX_VARIABLES,
    FrequencyCalibration,
    SiteProfile,
    apply_profile,
    candidate_layers,
    default_band_edges,
    load_profile,
    radial_bands,
    save_profile,
)
from recon.adapt.selfsup import KSpaceSplit, acs_mask, detect_acs, heldout_loss, split_mask, theta_operator

__all__ = [
    "MAX_VARIABLES",
    "FrequencyCalibration",
    "SiteProfile",
    "apply_profile",
    "candidate_layers",
    "default_band_edges",
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
