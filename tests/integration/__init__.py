"""Tests with real etcd, PostgreSQL, agent and server processes, network namespaces."""
