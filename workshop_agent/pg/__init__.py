"""PostgreSQL under the agent: the control layer the decision loop calls.

Layers, bottom up: ``config`` (the site file's ``database:`` section), ``secrets``
(password files), ``files`` (postgresql.conf, pg_hba.conf, auto conf), ``proc`` and
``ctl`` (programs and the postmaster, bounded in time), ``query`` (SQL), ``node``
and ``standby`` (one node's plumbing, following a primary), ``manager`` (what the
agent calls). Every failure is a ``PgError`` naming its step.
"""

from hapair.workshop_agent.pg.config import DatabaseConfig, parse_database
from hapair.workshop_agent.pg.errors import PgError, SecretError
from hapair.workshop_agent.pg.manager import PgManager, PgResult, Timeouts
from hapair.workshop_agent.pg.status import PgStatus, Replica

__all__ = [
    "DatabaseConfig",
    "PgError",
    "PgManager",
    "PgResult",
    "PgStatus",
    "Replica",
    "SecretError",
    "Timeouts",
    "parse_database",
]
