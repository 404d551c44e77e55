"""Validation at the edge: a bad value is a clear error naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from workflows.models import (
    AccountSettings,
    CronSchedule,
    Environment,
    JobDefinition,
    RunStatus,
    TriggerRequest,
)


def _job(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "account_id": "acme",
        "job_id": "42",
        "name": "nightly",
        "environment": {"project_dir": "/p"},
        "execute_steps": ["dbt build"],
    }
    base.update(kw)
    return base


def test_steps_are_kept_as_argv() -> None:
    job = JobDefinition.model_validate(
        _job(execute_steps=["dbt run -s 'tag:nightly' --full-refresh"])
    )
    assert job.execute_steps == [["dbt", "run", "-s", "tag:nightly", "--full-refresh"]]


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("rm -rf /", "must be a dbt command starting with 'dbt'"),
        ("dbt", "unknown dbt subcommand 'nothing'"),
        ("dbt frobnicate", "unknown dbt subcommand 'frobnicate'"),
        ("dbt run -s 'unclosed", "cannot split the command"),
    ],
    ids=["not-dbt", "bare-dbt", "unknown-subcommand", "bad-quoting"],
)
def test_a_step_that_is_not_a_dbt_command_is_rejected(step: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        JobDefinition.model_validate(_job(execute_steps=[step]))
    assert info.value.errors()[0]["loc"][0] == "execute_steps"


def test_an_int_env_value_is_an_error_naming_the_variable() -> None:
    # The dbt Cloud incident of August 2023: an int in a subprocess env dict.
    with pytest.raises(ValidationError) as info:
        Environment.model_validate({"project_dir": "/p", "env_vars": {"DBT_THREADS": 4}})
    error = info.value.errors()[0]
    assert error["loc"] == ("env_vars", "DBT_THREADS")
    assert "valid string" in error["msg"]


def test_an_int_env_override_on_a_trigger_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        TriggerRequest.model_validate({"overrides": {"env_vars": {"RETRIES": 3}}})
    assert info.value.errors()[0]["loc"] == ("overrides", "env_vars", "RETRIES")


def test_env_var_names_must_be_identifiers() -> None:
    with pytest.raises(ValidationError, match="env var name 'BAD-NAME'"):
        Environment.model_validate({"project_dir": "/p", "env_vars": {"BAD-NAME": "x"}})


@pytest.mark.parametrize(
    "cron",
    ["* * *", "61 * * * *", "*/5 * * * * *", "every day", ""],
    ids=["three-fields", "minute-61", "six-fields", "words", "empty"],
)
def test_invalid_cron_is_rejected_with_the_expected_shape(cron: str) -> None:
    with pytest.raises(ValidationError, match="invalid cron expression"):
        CronSchedule(cron=cron)


def test_unknown_timezone_is_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        CronSchedule(cron="0 * * * *", timezone="Mars/Olympus")


def test_unknown_fields_on_a_job_are_an_error_not_silently_dropped() -> None:
    with pytest.raises(ValidationError) as info:
        JobDefinition.model_validate(_job(shedule={"cron": "0 * * * *"}))
    assert info.value.errors()[0]["loc"] == ("shedule",)


def test_pull_request_trigger_requires_a_pr_id() -> None:
    with pytest.raises(ValidationError, match="needs pr_id"):
        TriggerRequest.model_validate({"cause": "pull_request"})


def test_ci_job_cannot_have_a_schedule() -> None:
    with pytest.raises(ValidationError, match=r"remove triggers\.schedule"):
        JobDefinition.model_validate(
            _job(job_type="ci", triggers={"schedule": {"cron": "0 * * * *"}})
        )


def test_account_durations_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="positive duration"):
        AccountSettings.model_validate({"account_id": "a", "max_queue_wait": 0})


def test_run_status_codes_and_names_are_dbt_clouds() -> None:
    assert {s.value: s.humanized for s in RunStatus} == {
        1: "Queued", 2: "Starting", 3: "Running", 10: "Success", 20: "Error", 30: "Cancelled",
    }  # fmt: skip


def test_job_deactivation_threshold_defaults_to_100() -> None:
    assert JobDefinition.model_validate(_job()).deactivate_after_failures == 100


def test_a_cron_that_never_fires_is_refused() -> None:
    with pytest.raises(ValidationError, match="never fires"):
        CronSchedule(cron="0 0 31 2 *")
