"""recon: MRI reconstruction library (operators, data, SURE, BiasRecon adaptation).

Never imports scores/: the prior (``denoise(x, sigma)``) and the sampler loop reach it through the
``Prior`` and ``Sampler`` protocols of :mod:`recon.biasrecon`, handed over by the scripts.

Layers, bottom up: maths (``fft``, ``operators``, ``masks``, ``coils``, ``dc``, ``sure``,
``metrics``), data in and out (``data``: readers, the simulator, ``data.transforms`` for the
submission format), algorithms (``adapt`` — calibration, profiles, the k-space split —,
``baselines``, ``biasrecon``), the method table (``methods``) and the settings schema (``config``),
and the app layer the scripts run (``runner`` over ``jobs`` and ``figures``, ``openworld``,
``bench``, ``speed_quality``). A module imports from its own layer or below, and the import graph has no cycle
(``tests/test_imports.py``).
"""

import importlib as _importlib
import warnings as _warnings

from tqdm import TqdmWarning as _TqdmWarning

# sigpy (ESPIRiT, the classical methods, the masks) imports tqdm.auto, which in a notebook without
# ipywidgets warns "IProgress not found" although no sigpy bar is ever shown here (show_pbar=False);
# recon's and scores' own bars are plain tqdm. Import it once, quietly, before sigpy does.
with _warnings.catch_warnings():
    _warnings.simplefilter("ignore", _TqdmWarning)
    _importlib.import_module("tqdm.auto")
