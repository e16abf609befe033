"""Benchmarks, each a module run on its own: ``python -m bench.NAME`` from the project root
(``make bench`` runs them all through ``bench.run_all``)."""
