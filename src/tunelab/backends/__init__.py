"""Compute backends behind one small protocol (see base.py); torch/mlx are imported lazily."""
