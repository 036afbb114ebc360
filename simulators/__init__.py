"""Simulators: PhiFlow PDE solvers usable as black boxes (imported as deepzero_oracle.simulators)."""
