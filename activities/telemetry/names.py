"""Names of Runslot's OpenTelemetry attributes and instruments (one place, so dashboards and
tests agree)."""

from __future__ import annotations

INSTRUMENTATION_SCOPE = "runslot"
SERVICE_NAME = "runslot"

# --- attributes (spans and metrics)
ACCOUNT = "runslot.account"
JOB = "runslot.job"
RUN = "runslot.run"
CAUSE = "runslot.cause"
STATUS = "runslot.status"
"""Humanized: Success, Error, Cancelled (dbt Cloud's names)."""
STATUS_CODE = "runslot.status_code"
"""dbt Cloud's code: 10, 20, 30."""
STATUS_MESSAGE = "runslot.status_message"
GIT_SHA = "runslot.git_sha"
DBT_VERSION = "runslot.dbt_version"
SCHEMA = "runslot.schema"
STEP_COUNT = "runslot.steps"
STEP_INDEX = "runslot.step.index"
STEP_COMMAND = "runslot.step.command"
STEP_STATUS = "runslot.step.status"
STEP_STATUS_CODE = "runslot.step.status_code"
STEP_EXIT_CODE = "runslot.step.exit_code"
STEP_MESSAGE = "runslot.step.message"
PHASE = "runslot.phase"
"""Where a run that failed to start ended: ``queue`` (never got a slot) or ``prep``."""
QUEUE = "runslot.queue"
"""Which queue a queue-depth point counts: ``job`` (the job's own queue) or ``slots``."""

# --- instruments
WAIT_TIME = "runslot.run.wait_time"
PREP_TIME = "runslot.run.prep_time"
RUNS_FINISHED = "runslot.runs.finished"
RUNS_FAILED_TO_START = "runslot.runs.failed_to_start"
QUEUE_DEPTH = "runslot.queue.depth"
SLOTS_IN_USE = "runslot.slots.in_use"
SLOTS_CAPACITY = "runslot.slots.capacity"
