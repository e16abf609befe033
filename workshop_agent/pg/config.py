"""The ``database:`` section lives with the site file models; re-exported here."""

from hapair.shared.database import DatabaseConfig as DatabaseConfig
from hapair.shared.database import Layout as Layout
from hapair.shared.database import parse_database as parse_database
