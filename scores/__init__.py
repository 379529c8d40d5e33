"""scores: score-based generative prior (noise schedules, networks, training, samplers).

Never imports recon/. The prior is used through ``ScoreModel.denoise(x, sigma)`` on complex64
images ``(B, 1, H, W)`` normalised so that the 99th percentile of the magnitude of their
low-resolution (centre-of-k-space) image is 1, with noise ``x = x0 + sigma (n_re + i n_im)``,
``n_re, n_im ~ N(0, 1)``.
"""

from scores.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from scores.config import PriorConfig, load_prior_config
from scores.model import ScoreModel, channels_to_complex, complex_to_channels
from scores.samplers import Denoiser, TweedieSampler, sample_predictor_corrector, sample_tweedie_dc
from scores.sde import VESchedule, VPSchedule, build_schedule, geometric_levels

__all__ = [
    "ScoreModel",
    "complex_to_channels",
    "channels_to_complex",
    "Denoiser",
    "sample_tweedie_dc",
    "TweedieSampler",
    "sample_predictor_corrector",
    "VESchedule",
    "VPSchedule",
    "build_schedule",
    "geometric_levels",
    "PriorConfig",
    "load_prior_config",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
]
