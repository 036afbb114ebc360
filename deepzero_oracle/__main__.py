"""``python -m deepzero_oracle ARGS``: the ``deepzero-oracle`` command line, the same as the console script."""

import runpy

if __name__ == "__main__":
    # the command line is the app layer above the engine: run it as a script rather than import it here
    runpy.run_module("deepzero_oracle.apps.cli", run_name="__main__", alter_sys=True)
