"""The REST + WebSocket API (`tunelab serve`): a thin adapter over :mod:`tunelab.services`."""
