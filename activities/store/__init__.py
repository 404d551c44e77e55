"""The run store: the SQL read model of accounts, jobs, runs, steps and API tokens.

``RunStore`` (store.py) is the API; ``StoreActivities`` (activities.py) are its Temporal
activities; schema.py holds the tables, migrate.py the Alembic wiring (revisions live in
``activities/migrations``), records.py the read models and the quarantine of bad rows.
"""

from activities.store.activities import StoreActivities
from activities.store.errors import (
    InvalidRecordError,
    RerunRefusedError,
    StoreError,
    UnknownAccountError,
    UnknownJobError,
    UnknownRunError,
)
from activities.store.records import (
    Page,
    Quarantined,
    StoredAccount,
    StoredDelivery,
    StoredEnvironment,
    StoredJob,
    StoredRun,
    StoredStep,
    StoredWebhook,
)
from activities.store.store import RunStore

__all__ = [
    "InvalidRecordError",
    "Page",
    "Quarantined",
    "RerunRefusedError",
    "RunStore",
    "StoreActivities",
    "StoreError",
    "StoredAccount",
    "StoredDelivery",
    "StoredEnvironment",
    "StoredJob",
    "StoredRun",
    "StoredStep",
    "StoredWebhook",
    "UnknownAccountError",
    "UnknownJobError",
    "UnknownRunError",
]
