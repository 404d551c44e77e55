"""Temporal workflows and the payload models they exchange."""
