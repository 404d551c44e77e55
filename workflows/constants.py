"""Task queues, workflow ids, search attributes, timeouts and retry policies.

Every name Temporal sees is pinned here, so renaming a class never orphans running workflows.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy, SearchAttributeKey

from workflows.errors import ErrorType

# Task queue names live in models.TaskQueues (carried in workflow inputs, so tests and
# dedicated worker pools can use their own).

# --- workflow type names
JOB_WORKFLOW = "JobWorkflow"
RUN_WORKFLOW = "RunWorkflow"
SLOTS_WORKFLOW = "SlotsWorkflow"

# --- handler names
SIGNAL_TRIGGER = "trigger"
UPDATE_TRIGGER = "trigger"
UPDATE_CONFIGURE = "configure"
UPDATE_CANCEL_RUN = "cancel_run"
UPDATE_DELETE = "delete"
SIGNAL_CANCEL_RUN = "cancel_run"
SIGNAL_PR_CLOSED = "pull_request_closed"
SIGNAL_RUN_FINISHED = "run_finished"
SIGNAL_UPSTREAM_FINISHED = "upstream_finished"
QUERY_DESCRIBE = "describe"
SIGNAL_SLOT_REQUEST = "request"
SIGNAL_SLOT_RELEASE = "release"
SIGNAL_SLOT_GRANTED = "slot_granted"
UPDATE_RESIZE = "resize"
UPDATE_SLOT_ACQUIRE = "acquire"
SIGNAL_RESIZE = "resize"

# --- search attributes (all registered by `runslot dev` and the test fixtures)
SA_ACCOUNT = SearchAttributeKey.for_keyword("RunslotAccount")
SA_JOB = SearchAttributeKey.for_keyword("RunslotJob")
SA_RUN = SearchAttributeKey.for_keyword("RunslotRun")
SA_CAUSE = SearchAttributeKey.for_keyword("RunslotCause")
SA_STATUS = SearchAttributeKey.for_keyword("RunslotStatus")
SA_UPSTREAM = SearchAttributeKey.for_keyword_list("RunslotUpstreamJobs")
"""On a job workflow: the jobs whose completion triggers it (rule 7)."""
SEARCH_ATTRIBUTES = (SA_ACCOUNT, SA_JOB, SA_RUN, SA_CAUSE, SA_STATUS, SA_UPSTREAM)


def job_workflow_id(account_id: str, job_id: str) -> str:
    return f"job:{account_id}:{job_id}"


def run_workflow_id(account_id: str, run_id: str) -> str:
    return f"run:{account_id}:{run_id}"


def slots_workflow_id(account_id: str) -> str:
    return f"slots:{account_id}"


def ci_schema_name(job_id: str, pr_id: int) -> str:
    """dbt Cloud's temporary schema for a pull request's CI runs."""
    return f"dbt_cloud_pr_{job_id}_{pr_id}".replace("-", "_").replace(".", "_")


# --- limits
MAX_QUEUED_RUNS_PER_JOB = 100
RECENT_RUNS_KEPT = 25
DEDUPE_KEYS_KEPT = 200
REJECTED_KEPT = 20
SLOT_LEASE_GRACE = timedelta(minutes=10)
DEFAULT_REAP_INTERVAL = timedelta(seconds=30)
ORPHAN_CHECK_INTERVAL = timedelta(minutes=1)
"""How often a job checks on its runs in flight while one of them is new (at most: the
account's reap interval when shorter). A run reports its own end by signal; the check
catches runs that cannot (terminated, failed workflow)."""
ORPHAN_CHECK_SLOW_AFTER = timedelta(minutes=2)
ORPHAN_CHECK_SLOW_INTERVAL = timedelta(minutes=5)
"""Once every run in flight is older than ``ORPHAN_CHECK_SLOW_AFTER``: a long dbt run
costs the job a check every 5 minutes, not every 30 seconds (6 history events each)."""

# --- activity timeouts
PREP_TIMEOUT = timedelta(minutes=15)
ARTIFACTS_TIMEOUT = timedelta(minutes=5)
CLEANUP_TIMEOUT = timedelta(minutes=5)
STEP_HEARTBEAT_TIMEOUT = timedelta(seconds=30)
TELEMETRY_TIMEOUT = timedelta(seconds=10)
LOCAL_ACTIVITY_TIMEOUT = timedelta(seconds=10)
VISIBILITY_ACTIVITY_TIMEOUT = timedelta(seconds=30)

# --- retry policies
STEP_RETRY = RetryPolicy(maximum_attempts=1)
"""dbt steps have side effects: never retried by Temporal; a failed step fails the run."""
PREP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=3,
    non_retryable_error_types=list(ErrorType.NON_RETRYABLE),
)
TELEMETRY_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=2)
"""Bounded: telemetry retries can never pile up (the dbt Cloud incident of February 2026)."""
STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=5,
)
"""Run store calls from workflows (local activities): a few quick attempts; the store's
own errors say whether a retry can help (``non_retryable``). A write that
still fails is kept and retried later by the job, or logged by the run (the final snapshot
uses ``STORE_FINAL_RETRY``)."""
STORE_FINAL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=30,
)
"""A run's final snapshot: about 12 minutes of attempts, after the slot is released."""
STORE_UNAVAILABLE = "StoreUnavailable"
"""``ApplicationError.type`` of a store call that failed for want of the store (not refused)."""
PENDING_RECORDS_KEPT = 500
"""Runs a job keeps for the store while it is down (oldest dropped first, with a warning)."""
STORE_RETRY_AFTER = timedelta(seconds=30)
"""How long a job waits before retrying store work that failed (a cron fire, a record)."""
CONTROL_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=5,
)

# --- webhooks out (dbt Cloud's job.run.* events)
WEBHOOKS_WORKFLOW = "WebhooksWorkflow"
SIGNAL_WEBHOOK_DELIVERIES = "deliveries"
EVENT_RUN_STARTED = "job.run.started"
EVENT_RUN_COMPLETED = "job.run.completed"
EVENT_RUN_ERRORED = "job.run.errored"
"""Sent in addition to ``job.run.completed`` when a run ends in Error (as dbt Cloud does)."""
WEBHOOK_EVENT_TYPES = (EVENT_RUN_STARTED, EVENT_RUN_COMPLETED, EVENT_RUN_ERRORED)
WEBHOOK_DELIVERY_FAILED = "WebhookDeliveryFailed"
"""``ApplicationError.type`` of an attempt the receiver did not accept (retried)."""
WEBHOOK_NOT_CONFIGURED = "WebhookNotConfigured"
"""``ApplicationError.type`` when the worker has no signing key (never retried)."""


def webhooks_workflow_id(account_id: str) -> str:
    return f"webhooks:{account_id}"


WEBHOOK_PUBLISH_TIMEOUT = timedelta(seconds=5)
WEBHOOK_PUBLISH_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=1),
    maximum_attempts=3,
)
"""Publishing is a local activity on a run's path: a few quick attempts, then the event is
dropped with a warning (it runs beside the store write, which retries longer)."""
WEBHOOK_HTTP_TIMEOUT = timedelta(seconds=5)
"""One POST, connection to last byte: a slow receiver is cut off here."""
WEBHOOK_ATTEMPT_TIMEOUT = timedelta(seconds=10)
"""Start-to-close of one delivery attempt (the POST plus the delivery-log write)."""
WEBHOOK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=40),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=6),
    maximum_attempts=5,
    non_retryable_error_types=[WEBHOOK_NOT_CONFIGURED],
)
"""dbt Cloud's five attempts: waits of 40 s, 80 s, 160 s and 320 s, about 10 minutes."""
WEBHOOK_DELIVERY_DEADLINE = timedelta(hours=1)
"""Schedule-to-close of a delivery: the retries plus time for a stopped telemetry worker to
come back; after it the event is given up (logged), so a backlog never grows without end."""
WEBHOOK_IDLE_TIMEOUT = timedelta(minutes=10)
"""A webhooks workflow with nothing to deliver for this long ends (an idle account costs
nothing); the next event starts it again."""
WEBHOOK_MAX_IN_FLIGHT = 10
"""Deliveries of one account at once (each is an activity on the telemetry queue, whose
worker has 50 slots: a few accounts with dead receivers cannot take them all)."""
WEBHOOK_MAX_IN_FLIGHT_PER_SUBSCRIPTION = 4
"""So that one dead receiver leaves room for the account's other subscriptions."""
WEBHOOK_PENDING_KEPT = 1000
"""Deliveries waiting to start; beyond it the oldest are dropped with a warning."""
WEBHOOK_SEEN_KEPT = 500
"""Recent (subscription, event) keys kept to drop a republished event."""
