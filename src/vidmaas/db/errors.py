"""Which database errors mean "the database is unreachable", for callers without SQLAlchemy.

Guarantees: ``is_transient(exc)`` is True for the connection-level failures of the
driver and the pool (``OperationalError``, ``InterfaceError``, the pool's
``TimeoutError``) and for the standard library's ``ConnectionError`` and
``TimeoutError``; False for everything else, including integrity errors and bugs in
a statement, which retrying cannot mend. ``TRANSIENT`` is the same as a tuple for
``except`` clauses.
"""

from __future__ import annotations

import sqlalchemy.exc

TRANSIENT: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is (for now) out of reach."""
    return isinstance(exc, TRANSIENT)
