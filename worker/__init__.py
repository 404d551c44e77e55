"""The worker process: ``python -m worker`` / ``runslot worker``."""
