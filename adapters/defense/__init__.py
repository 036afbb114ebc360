"""Black-box defense (installed as ``deepzero_oracle.adapters.defense``): ZO-trained denoisers
in front of a classifier that can only be queried, and randomized-smoothing certification.

Modules: ``smoothing`` (Cohen et al.'s CERTIFY / PREDICT), ``certify_log`` (per-image logs,
resumable certification, tables), ``denoiser`` (the white-box fronts), ``methods`` (FO-DS,
ZO-DS, ZO-AE-DS through the engine's Trainer), ``classifier`` (the example frozen classifier),
``cli`` (``deepzero-oracle defense``).
"""
