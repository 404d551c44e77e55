"""Client side: the Temporal client, the CLI, the embedded stack and job operations."""
