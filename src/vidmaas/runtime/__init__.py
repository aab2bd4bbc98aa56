"""The job runtime: what runs inside each generation job (DESIGN §5, §6).

A separate program (``vidmaas-job``) that runs in a GPU image, inside a PyTorchJob
pod or a local process group. It talks only to Redis (events, cancel flag) and the
object store (input image, output video); it never imports the control plane
(``api``, ``db``, ``dispatcher``, ``relay``). Importing this package does nothing:
no environment read, no torch import.
"""
