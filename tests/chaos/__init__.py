"""The chaos suite: hundreds of seeded random faults against a real site in network
namespaces, checked from the services' own records (``make chaos``; see run.py)."""
