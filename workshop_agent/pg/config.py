"""The ``database:`` section lives with the site file models; re-exported here."""

from shared.database import DatabaseConfig as DatabaseConfig
from shared.database import Layout as Layout
from shared.database import parse_database as parse_database
