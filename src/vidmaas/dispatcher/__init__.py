"""The dispatcher role: admission, fairness, executors, watchdog, reconciler."""
