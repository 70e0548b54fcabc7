"""Sweeps over the (D1, D2) grid: plan (grid.py), run locally (local.py), or on SLURM (slurm.py)."""
