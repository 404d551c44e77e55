"""Revisions, one file each (``rNNNN_slug.py``; the revision id is ``NNNN``)."""
