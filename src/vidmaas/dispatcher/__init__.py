"""The dispatcher role, a folder of named parts (DESIGN §10).

``service`` (the ``Dispatcher``: composes the parts, runs and supervises their loops),
``context`` (what the parts share), ``admission``, ``outcomes`` (job states → task
transitions, cancels), ``watchdog``, ``reconciler``, and ``executors/`` (where jobs
run: ``local``, ``kubernetes/``, ``fake``).
"""
