"""The real dbt Cloud client tools, run against Runslot's API: their venv and how to call them."""
