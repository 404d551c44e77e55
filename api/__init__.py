"""The dbt Cloud-compatible REST API (`runslot api`)."""
