"""Executors: where jobs run (local process groups, Kubernetes PyTorchJobs)."""
