"""The job queue (in the registry DB) and the worker that runs its jobs in child processes."""
