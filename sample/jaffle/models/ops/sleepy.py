import time


def model(dbt, session):
    """A step that takes a while: for cancel and timeout tests."""
    seconds = float(dbt.config.get("sleep_seconds"))
    print(f"sleeping {seconds}s", flush=True)
    time.sleep(seconds)
    return session.sql("select 1 as slept")
