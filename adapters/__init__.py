"""Applications built from the public engine API: ``sol`` (solver-in-the-loop correctors) and
``defense`` (a ZO-trained denoiser in front of a black-box classifier, then certified).

This folder sits at the top of the repository but installs as ``deepzero_oracle.adapters``
(``import deepzero_oracle.adapters.sol``), because a bare ``adapters`` would collide with an
unrelated package on PyPI. Each adapter's ``cli.py`` adds its ``deepzero-oracle`` subcommands
through an entry point; the engine never imports anything here. The adapters import only the
engine's public names (those in its modules' ``__all__``) and the shared room
``deepzero_oracle.common`` (data, model zoo, command-line conventions), never the app layer
``deepzero_oracle.apps``; tests/engine/test_layers.py checks both.
"""
