"""The backend-agnostic training loop, LR schedules, checkpoints and callbacks."""
