"""Alembic migrations of the run store (``RunStore.migrate()`` runs them; no alembic.ini).

Rules (expand/contract, so the previous release can still read the schema):

* a revision only *adds*: tables, nullable columns or columns with a server default, indexes;
* a column or table is dropped only once no supported release reads it any more;
* revisions never import ``activities.store.schema``: they spell out their own columns;
* a new revision gets a frozen snapshot of the columns it reads in ``tests/store_fixtures.py``.

Create one with ``python -m activities.store --url URL revision -m "what changes"``.
"""
