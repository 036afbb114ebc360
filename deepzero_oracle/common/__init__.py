"""What the app layer and the adapters share: the example data, the model zoo and the command-line
conventions. Above the engine, below its users.

- ``datasets``: example image data that ships inside PyPI wheels (digits, MNIST-5k) and the
  user's own images (``--data``), as one ``Dataset``.
- ``models``: the model zoo (small MLP, CNN and ResNet learners).
- ``options``: the conventions every ``deepzero-oracle`` command follows (run folders, ``--json``,
  ``--executor``, help format).

Imports point down: this package uses the engine's public API; the engine never imports it, and
it never imports ``deepzero_oracle.apps`` or the adapters (tests/engine/test_layers.py checks).
"""
