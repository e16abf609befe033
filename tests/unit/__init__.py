"""Tests of pure logic: no etcd, PostgreSQL, root or server process; ``make unit``."""
