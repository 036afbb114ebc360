"""Solver-in-the-loop correctors trained through solver queries."""
