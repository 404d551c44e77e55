"""The real public dbt Cloud clients against Runslot's API, end to end.

``dbt-cloud-cli`` and ``dbt-jobs-as-code`` from PyPI (pinned in tests/clients/requirements.txt)
run as subprocesses from their own venv against the ``api_server`` fixture: Runslot's API on
127.0.0.1 over a real Temporal dev server, real workers and real dbt runs of
``sample/jaffle``. The scenarios follow the acceptance recipes of dbt-cloud-api.md §3:
dbt-cloud-cli over HTTPS (it hard-codes ``https://``) with a throwaway certificate,
dbt-jobs-as-code over plain HTTP. If a client cannot use the API the way it uses dbt Cloud,
these tests fail, whatever the API's own unit tests say.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from tests.clients.harness import (
    ApiServer,
    ClientResult,
    DbtCloudCli,
    JobsAsCode,
    ensure_client_venv,
)

pytestmark = [pytest.mark.slow, pytest.mark.devserver]

RUN_TIMEOUT = 600.0
"""``job run --wait`` of a real ``dbt seed`` + ``dbt build``; the client polls every 5 s."""
STATE_TIMEOUT = 180.0
"""A run reaching a given state (running, cancelled) as seen through ``dbt-cloud run get``."""
SLEEPY = "dbt run --select sleepy --vars '{ops_enabled: true, sleep_seconds: 300}'"
"""A step that runs for minutes (sample/jaffle's ops model): a run surely still running when
the test cancels it."""
SUCCESS, CANCELLED = 10, 30


@pytest_asyncio.fixture(scope="session")
async def client_venv() -> Path:
    return await ensure_client_venv()


@pytest.fixture
def dbt_cloud(client_venv: Path, api_server: ApiServer, tmp_path: Path) -> DbtCloudCli:
    return DbtCloudCli(client_venv, api_server, tmp_path)


@pytest.fixture
def jobs_as_code(client_venv: Path, api_server: ApiServer, tmp_path: Path) -> JobsAsCode:
    return JobsAsCode(client_venv, api_server, tmp_path)


def show(value: object) -> str:
    """An assertion message in full: pytest cuts a non-string message to a few hundred
    characters, and the useful part (a client's traceback, a response field) is often last."""
    if isinstance(value, str | ClientResult):
        return str(value)
    return json.dumps(value, indent=1, default=str)


def envelope(result: ClientResult) -> Any:
    """The JSON a successful command printed, after checking it exited 0 with a success
    envelope (the clients decide success from the HTTP status, the envelope must agree)."""
    assert result.returncode == 0, show(result)
    body = result.json()
    assert body["status"]["is_success"] is True, show(result)
    return body


async def create_job(dbt_cloud: DbtCloudCli, server: ApiServer, steps: list[str]) -> int:
    name = f"client-test-{uuid.uuid4().hex[:8]}"
    created = envelope(await dbt_cloud(
        "job", "create",
        "--project-id", str(server.project_id),
        "--environment-id", str(server.environment_id),
        "--name", name,
        "--execute-steps", json.dumps(steps),
    ))["data"]  # fmt: skip
    assert isinstance(created["id"], int), show(created)
    assert created["name"] == name and created["execute_steps"] == steps, show(created)
    assert created["project_id"] == server.project_id, show(created)
    assert created["environment_id"] == server.environment_id, show(created)
    assert created["state"] == 1, show(created)
    # The client sends "job_type": null; the API must default it, never echo the null.
    assert created["job_type"] in {"scheduled", "ci", "merge", "other"}, show(created)
    job_id: int = created["id"]
    return job_id


async def wait_for_run(
    dbt_cloud: DbtCloudCli, run_id: int, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll ``dbt-cloud run get`` (as a user's script would) until ``until(run)`` holds."""
    deadline = asyncio.get_running_loop().time() + STATE_TIMEOUT
    while True:
        got = await dbt_cloud("run", "get", "--run-id", str(run_id))
        run: dict[str, Any] = envelope(got)["data"]
        if until(run):
            return run
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"run {run_id} did not get there in {STATE_TIMEOUT:.0f} s; last: {run}")
        await asyncio.sleep(1.0)


async def test_dbt_cloud_cli_runs_a_job_and_reads_its_steps_and_artifacts(
    dbt_cloud: DbtCloudCli, api_server: ApiServer, tmp_path: Path
) -> None:
    job_id = await create_job(dbt_cloud, api_server, ["dbt build"])
    fetched = envelope(await dbt_cloud("job", "get", "--job-id", str(job_id)))["data"]
    assert fetched["id"] == job_id and fetched["execute_steps"] == ["dbt build"], show(fetched)

    # Trigger with the body dbt-cloud-cli really sends (account_id, job_id and explicit nulls
    # beside the overrides) and let the client poll until the run ends: exit 0 means it saw 10.
    run_file = tmp_path / "run.json"
    triggered = await dbt_cloud(
        "job", "run", "--job-id", str(job_id), "--cause", "runslot client test",
        "--steps-override", json.dumps(["dbt seed", "dbt build"]),
        "--wait", "-f", str(run_file), timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert triggered.returncode == 0, show(triggered)
    run = json.loads(run_file.read_text())["data"]
    run_id = run["id"]
    assert run["status"] == SUCCESS and run["status_humanized"] == "Success", show(run)
    assert run["is_success"] is True and run["is_complete"] is True, show(run)
    assert run["in_progress"] is False and run["is_error"] is False, show(run)
    assert run["job_definition_id"] == job_id, show(run)
    assert f"run {run_id}: SUCCESS" in triggered.stderr, show(triggered)

    # One run, seen with its steps, its job and its trigger (the client sends a JSON array).
    detail = envelope(await dbt_cloud(
        "run", "get", "--run-id", str(run_id),
        "--include-related", "run_steps", "--include-related", "job",
        "--include-related", "trigger",
    ))["data"]  # fmt: skip
    steps = {step["name"]: step for step in detail["run_steps"]}
    seed = steps.get("Invoke dbt with `dbt seed`")
    build = steps.get("Invoke dbt with `dbt build`")
    assert seed is not None and build is not None, show(list(steps))
    assert seed["index"] < build["index"], show(detail["run_steps"])
    assert seed["status"] == SUCCESS and build["status"] == SUCCESS, show(detail["run_steps"])
    assert build["logs"], show(build)  # run logs reach clients only through run_steps
    assert detail["job"]["id"] == job_id, show(detail["job"])
    assert detail["trigger"]["cause"] == "runslot client test", show(detail["trigger"])
    assert detail["trigger"]["steps_override"] == ["dbt seed", "dbt build"], show(detail["trigger"])

    listed = envelope(await dbt_cloud("run", "list-artifacts", "--run-id", str(run_id)))["data"]
    assert {"manifest.json", "run_results.json"} <= set(listed), show(listed)

    manifest_file = tmp_path / "manifest.json"
    got = await dbt_cloud(
        "run", "get-artifact", "--run-id", str(run_id), "--path", "manifest.json",
        "-f", str(manifest_file),
    )  # fmt: skip
    assert got.returncode == 0, show(got)
    manifest = json.loads(manifest_file.read_text())
    assert "manifest" in manifest["metadata"]["dbt_schema_version"], show(manifest["metadata"])
    assert "model.jaffle.customers" in manifest["nodes"], show(sorted(manifest["nodes"])[:20])

    # No ?step: the last step's artifacts (dbt build: models and tests).
    results_file = tmp_path / "run_results.json"
    got = await dbt_cloud(
        "run", "get-artifact", "--run-id", str(run_id), "--path", "run_results.json",
        "-f", str(results_file),
    )  # fmt: skip
    assert got.returncode == 0, show(got)
    results = json.loads(results_file.read_text())["results"]
    assert any(r["unique_id"] == "model.jaffle.customers" for r in results), show(results)
    assert {r["status"] for r in results} <= {"success", "pass"}, show(results)

    # ?step=N: the seed step's own run_results, seeds only.
    seed_results_file = tmp_path / "seed_run_results.json"
    got = await dbt_cloud(
        "run", "get-artifact", "--run-id", str(run_id), "--path", "run_results.json",
        "--step", str(seed["index"]), "-f", str(seed_results_file),
    )  # fmt: skip
    assert got.returncode == 0, show(got)
    seed_results = json.loads(seed_results_file.read_text())["results"]
    assert seed_results, show(seed_results)
    assert all(r["unique_id"].startswith("seed.jaffle.") for r in seed_results), show(seed_results)

    # A missing artifact: an HTTP error with a JSON envelope (the client saves the body).
    missing_file = tmp_path / "missing.json"
    got = await dbt_cloud(
        "run", "get-artifact", "--run-id", str(run_id), "--path", "no-such-artifact.json",
        "-f", str(missing_file),
    )  # fmt: skip
    assert got.returncode != 0, show(got)
    missing = json.loads(missing_file.read_text())["status"]
    assert missing["is_success"] is False and missing["code"] == 404, show(missing)

    # Cancelling a finished run returns it unchanged.
    after_cancel = envelope(await dbt_cloud("run", "cancel", "--run-id", str(run_id)))["data"]
    assert after_cancel["id"] == run_id and after_cancel["status"] == SUCCESS, show(after_cancel)

    # --paginate loops on extra.pagination until offset reaches total_count.
    succeeded = envelope(await dbt_cloud(
        "run", "list", "--job-id", str(job_id), "--status", "Succeeded", "--paginate",
    ))  # fmt: skip
    assert [r["id"] for r in succeeded["data"]] == [run_id], show(succeeded)
    assert succeeded["extra"]["pagination"]["total_count"] == 1, show(succeeded["extra"])

    deleted = envelope(await dbt_cloud("job", "delete", "--job-id", str(job_id)))["data"]
    assert deleted["id"] == job_id and deleted["state"] == 2, show(deleted)
    remaining = envelope(await dbt_cloud(
        "job", "list", "--project-id", str(api_server.project_id),
    ))["data"]  # fmt: skip
    assert job_id not in {job["id"] for job in remaining}, show(remaining)


async def test_dbt_cloud_cli_cancels_running_runs_and_pages_the_run_list(
    dbt_cloud: DbtCloudCli, api_server: ApiServer
) -> None:
    job_id = await create_job(dbt_cloud, api_server, [SLEEPY])

    first = envelope(await dbt_cloud("job", "run", "--job-id", str(job_id)))["data"]
    assert first["status"] in {1, 2, 3} and first["in_progress"] is True, show(first)
    await wait_for_run(dbt_cloud, first["id"], lambda run: run["status"] == 3)
    cancel = envelope(await dbt_cloud("run", "cancel", "--run-id", str(first["id"])))["data"]
    assert cancel["id"] == first["id"], show(cancel)
    ended = await wait_for_run(dbt_cloud, first["id"], lambda run: run["is_complete"])
    assert ended["status"] == CANCELLED and ended["status_humanized"] == "Cancelled", show(ended)
    assert ended["is_cancelled"] is True and ended["is_success"] is False, show(ended)

    # A second run, cancelled as soon as it is queued.
    second = envelope(await dbt_cloud("job", "run", "--job-id", str(job_id)))["data"]
    envelope(await dbt_cloud("run", "cancel", "--run-id", str(second["id"])))
    ended = await wait_for_run(dbt_cloud, second["id"], lambda run: run["is_complete"])
    assert ended["status"] == CANCELLED and ended["is_cancelled"] is True, show(ended)

    cancelled = envelope(await dbt_cloud(
        "run", "list", "--job-id", str(job_id), "--status", "Canceled", "--paginate",
    ))  # fmt: skip
    assert {r["id"] for r in cancelled["data"]} == {first["id"], second["id"]}, show(cancelled)
    assert all(r["status"] == CANCELLED for r in cancelled["data"]), show(cancelled)

    # One run per page, newest first: count is the page, total_count all matches, and the
    # filters echo limit and offset as ints.
    for offset, expected in ((0, second["id"]), (1, first["id"])):
        page = envelope(await dbt_cloud(
            "run", "list", "--job-id", str(job_id), "--order-by", "-id",
            "--limit", "1", "--offset", str(offset),
        ))  # fmt: skip
        assert [r["id"] for r in page["data"]] == [expected], show(page)
        assert page["extra"]["pagination"] == {"count": 1, "total_count": 2}, show(page["extra"])
        assert page["extra"]["filters"]["limit"] == 1, show(page["extra"])
        assert page["extra"]["filters"]["offset"] == offset, show(page["extra"])

    envelope(await dbt_cloud("job", "delete", "--job-id", str(job_id)))


async def test_clients_are_refused_with_a_wrong_token(
    dbt_cloud: DbtCloudCli, jobs_as_code: JobsAsCode, api_server: ApiServer, tmp_path: Path
) -> None:
    # dbt-cloud-cli: "Authorization: Token …"; it prints the body, so the 401 must be JSON.
    refused = await dbt_cloud(
        "job", "list", "--project-id", str(api_server.project_id),
        env={"DBT_CLOUD_API_TOKEN": "not-the-token"},
    )  # fmt: skip
    assert refused.returncode == 1, show(refused)
    assert refused.json()["status"]["is_success"] is False, show(refused)
    assert "401" in refused.stderr, show(refused)

    # dbt-jobs-as-code: "Authorization: Bearer …"; it reads the error body as JSON too.
    jobs_yml = tmp_path / "jobs.yml"
    jobs_yml.write_text(yaml.safe_dump({"jobs": {"refused": nightly_job(api_server, 4)}}))
    refused = await jobs_as_code("plan", str(jobs_yml), env={"DBT_API_KEY": "not-the-token"})
    assert refused.returncode != 0, show(refused)
    assert "401 Unauthorized" in refused.stderr, show(refused)


def nightly_job(server: ApiServer, threads: int) -> dict[str, Any]:
    """The job of recipe §3.4, as dbt-jobs-as-code's YAML spells it."""
    return {
        "account_id": int(server.account_id),
        "project_id": server.project_id,
        "environment_id": server.environment_id,
        "name": "Nightly build",
        "description": "Managed by dbt-jobs-as-code in Runslot's client tests",
        "settings": {"threads": threads, "target_name": "prod"},
        "execution": {"timeout_seconds": 0},
        "run_generate_sources": False,
        "execute_steps": ["dbt build"],
        "generate_docs": False,
        "schedule": {"cron": "0 2 * * *"},
        "triggers": {
            "github_webhook": False,
            "git_provider_webhook": False,
            "schedule": True,
            "on_merge": False,
        },
        "job_type": "scheduled",
    }


def expect_job_changes(result: ClientResult, *expected: tuple[str, str]) -> Any:
    """Check that ``plan --json`` or ``sync --json`` succeeded with exactly these
    ``(action, identifier)`` job changes, in order; return its JSON."""
    assert result.returncode == 0, show(result)
    body = result.json()
    changes = [(change["action"], change["identifier"]) for change in body["job_changes"]]
    assert changes == list(expected), show(result)
    return body


async def test_dbt_jobs_as_code_validates_online_against_the_projects_environments(
    jobs_as_code: JobsAsCode, api_server: ApiServer, tmp_path: Path
) -> None:
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump({"jobs": {"nightly": nightly_job(api_server, 4)}}))
    valid = await jobs_as_code("validate", str(good), "--online")
    assert valid.returncode == 0, show(valid)
    assert "The config file is valid" in valid.stderr, show(valid)

    unknown_env = {**nightly_job(api_server, 4), "environment_id": 987654321}
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"jobs": {"nightly": unknown_env}}))
    invalid = await jobs_as_code("validate", str(bad), "--online")
    assert invalid.returncode == 1, show(invalid)
    assert "environment IDs are not valid: {987654321}" in invalid.stderr, show(invalid)


async def test_dbt_jobs_as_code_plans_syncs_updates_imports_and_deletes_a_job(
    jobs_as_code: JobsAsCode, api_server: ApiServer, tmp_path: Path
) -> None:
    ident = f"nightly_{uuid.uuid4().hex[:8]}"
    jobs_yml = tmp_path / "jobs.yml"
    jobs_yml.write_text(yaml.safe_dump({"jobs": {ident: nightly_job(api_server, 4)}}))

    expect_job_changes(await jobs_as_code("plan", str(jobs_yml), "--json"), ("CREATE", ident))
    synced = expect_job_changes(
        await jobs_as_code("sync", str(jobs_yml), "--json"), ("CREATE", ident)
    )
    assert synced["apply_success"] is True, show(synced)
    [applied] = synced["applied"]["job_changes"]
    assert applied["action"] == "CREATE" and isinstance(applied["job_id"], int), show(applied)

    # Idempotent: the API stores and echoes every field it was sent, so nothing differs.
    expect_job_changes(await jobs_as_code("plan", str(jobs_yml), "--json"))

    jobs_yml.write_text(yaml.safe_dump({"jobs": {ident: nightly_job(api_server, 8)}}))
    updated = expect_job_changes(
        await jobs_as_code("sync", str(jobs_yml), "--json"), ("UPDATE", ident)
    )
    assert updated["apply_success"] is True, show(updated)
    differences = updated["job_changes"][0]["differences"]
    assert differences == {
        "values_changed": {"root['settings']['threads']": {"new_value": 8, "old_value": 4}}
    }, show(differences)
    expect_job_changes(await jobs_as_code("plan", str(jobs_yml), "--json"))

    # import-jobs writes the YAML back from the API; planning that YAML changes nothing.
    imported = await jobs_as_code(
        "import-jobs", "--account-id", api_server.account_id,
        "--project-id", str(api_server.project_id),
        "--environment-id", str(api_server.environment_id), "--managed-only",
    )  # fmt: skip
    assert imported.returncode == 0, show(imported)
    exported = yaml.safe_load(imported.stdout)["jobs"]
    assert ident in exported, show(imported)
    job = exported[ident]
    assert job["settings"] == {"threads": 8, "target_name": "prod"}, show(job)
    assert job["name"] == "Nightly build" and job["schedule"]["cron"] == "0 2 * * *", show(job)
    imported_yml = tmp_path / "imported.yml"
    imported_yml.write_text(imported.stdout)
    expect_job_changes(await jobs_as_code("plan", str(imported_yml), "--json"))

    # Deletion: the job leaves the YAML. With no job left in the file, the tool reconciles
    # deletions only when told the project, the environment and the account.
    empty_yml = tmp_path / "empty.yml"
    empty_yml.write_text("jobs: {}\n")
    scope = (
        "-p", str(api_server.project_id), "-e", str(api_server.environment_id),
        "--account-id", api_server.account_id,
    )  # fmt: skip
    removed = expect_job_changes(
        await jobs_as_code("sync", str(empty_yml), *scope, "--json"), ("DELETE", ident)
    )
    assert removed["apply_success"] is True, show(removed)
    expect_job_changes(await jobs_as_code("plan", str(empty_yml), *scope, "--json"))
    # The deleted job (state 2) is gone from the list: the original YAML would create it anew.
    expect_job_changes(await jobs_as_code("plan", str(jobs_yml), "--json"), ("CREATE", ident))
