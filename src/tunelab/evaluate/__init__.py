"""Scoring a model on held-out examples: what it generates, against what the data says it should."""
