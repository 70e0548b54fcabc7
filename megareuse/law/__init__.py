"""Scaling laws for reuse: forms, fitting, checks, planning."""
