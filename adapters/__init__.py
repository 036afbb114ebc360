"""Reference applications built only from the public engine API (imported as deepzero_oracle.adapters)."""
