"""The two bases of hapair's pydantic models, one per kind of input.

A file a person writes (the site file, a comm server's PLC list, a database section), or
a value hapair's own code builds, is read strictly: a field hapair does not know is a
typo, refused by name, never silently ignored. A value hapair itself wrote and reads
back (etcd records, a registry's answer, a committed process context) may come from a
later version: its unknown fields are ignored. Both are frozen: a parsed value is never
changed in place.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Written by a person or built in the code: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LenientModel(BaseModel):
    """Written by hapair, maybe a later version of it: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)
