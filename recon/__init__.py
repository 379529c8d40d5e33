"""recon: MRI reconstruction library (operators, data, SURE, BiasRecon adaptation).

Never imports scores/: the prior (``denoise(x, sigma)``) and the sampler loop reach it through the
``Prior`` and ``Sampler`` protocols of :mod:`recon.biasrecon`, handed over by the scripts.

Layers, bottom up: maths (``fft``, ``operators``, ``masks``, ``coils``, ``dc``, ``sure``,
``metrics``, ``data``), algorithms (``adapt`` — calibration, profiles, the k-space split —,
``baselines``, ``biasrecon``), the method table (``methods``) and the settings schema (``config``),
and the app layer the scripts run (``runner`` over ``jobs``, ``figures``, ``data.transforms``).
"""
