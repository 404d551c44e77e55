import time


def model(dbt, session):
    """A step that really allocates (and touches) memory: for the memory limit test."""
    megabytes = int(dbt.config.get("megabytes"))
    hog = b"x" * (megabytes * 1024 * 1024)
    time.sleep(5)
    return session.sql(f"select {len(hog)} as bytes_held")
