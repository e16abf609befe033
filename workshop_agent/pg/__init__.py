"""PostgreSQL under the agent: the control layer the decision loop calls.

Layers, bottom up: ``config`` (the site file's ``database:`` section), ``secrets``
(password files), ``files`` (postgresql.conf, pg_hba.conf, auto conf), ``proc`` and
``ctl`` (programs and the postmaster, bounded in time), ``query`` (SQL), ``node``
and ``standby`` (one node's plumbing, following a primary), ``manager`` (what the
agent calls). Every failure is a ``PgError`` naming its step.

Nothing is imported here: the agent of a pair without a database never loads psycopg
(about 10 MiB of its memory), and ``config``, ``errors`` and ``status`` need none.
"""
