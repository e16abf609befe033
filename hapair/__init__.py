"""hapair: high availability for industrial workshop server pairs.

The four parts live in the project's top-level folders (``workshop_agent``,
``comm_server``, ``registry``, ``shared``) and are installed, and imported, as
``hapair.workshop_agent`` and so on: nothing generic lands in a user's environment.
"""
