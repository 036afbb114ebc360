"""The app layer: the ``deepzero-oracle`` command line and the example applications.

- ``cli``: the console script; subcommands come from ``deepzero_oracle.commands`` entry points.
- ``classify``: the classifier app (``deepzero-oracle train``): an image classifier trained by
  ZO estimates or the FO baseline.
- ``bench``: the engine benchmark (``deepzero-oracle bench``).

The data, the model zoo and the command-line conventions it shares with the adapters live in
``deepzero_oracle.common``. The engine (everything else in ``deepzero_oracle``), ``common`` and
the adapters never import this package; a test checks.
"""
