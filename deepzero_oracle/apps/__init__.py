"""The app layer: the ``deepzero-oracle`` command line and the example applications.

- ``cli``: the console script; subcommands come from ``deepzero_oracle.commands`` entry points.
- ``options``: the conventions every command follows (run folders, ``--json``, help format).
- ``classify``: the classifier app (``deepzero-oracle train``): an image classifier trained by
  ZO estimates or the FO baseline.
- ``datasets``: example image data that ships inside PyPI wheels (digits, MNIST-5k).
- ``models``: the model zoo (small MLP and CNN learners).
- ``bench``: the engine benchmark (``deepzero-oracle bench``).

The engine (everything else in ``deepzero_oracle``) never imports this package; a test checks.
"""
