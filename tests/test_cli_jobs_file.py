"""Jobs files: what they accept, and that the job bodies ``runslot jobs apply`` sends mean
to the API exactly the job the file describes (the API's own body-to-definition mapping is
the judge). Also the log tailing of ``runslot run --wait``."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.convert_jobs import build_definition, parse_job
from starter.cli_runs import LogTail
from starter.jobs_file import (
    JobsFileError,
    apply_jobs_file,
    differs,
    job_body,
    load_jobs_file,
)
from workflows.models import RunStatus

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobs.yml"
    path.write_text(text)
    return path


def test_the_example_file_parses_and_resolves_paths_against_the_current_directory() -> None:
    spec = load_jobs_file(ROOT / "examples" / "jobs.yml", base=ROOT)
    assert spec.account is not None and spec.account.account_id == "1"
    env = spec.environments["jaffle"]
    assert env.project_id == 1
    assert env.environment.project_dir == str(ROOT / "sample" / "jaffle")
    assert env.environment.profile["path"] == str(ROOT / ".runslot" / "warehouse.duckdb")
    assert [(j.definition.job_id, j.environment) for j in spec.jobs] == [("daily", "jaffle")]


def test_an_inline_environment_of_the_older_shape_is_named_after_its_job(tmp_path: Path) -> None:
    spec = load_jobs_file(
        write(
            tmp_path,
            "account: {account_id: 1, run_slots: 2}\n"
            "jobs:\n"
            "  - job_id: nightly\n"
            "    name: Nightly\n"
            "    environment: {project_dir: /p}\n"
            "    execute_steps: [dbt build]\n",
        )
    )
    assert spec.account is not None and spec.account.account_id == "1"
    assert spec.environments["nightly"].environment.project_dir == "/p"
    assert spec.jobs[0].environment == "nightly"


@pytest.mark.parametrize(
    ("job", "problem"),
    [
        pytest.param(
            "{environment: nope, execute_steps: [dbt build]}",
            "names environment 'nope'",
            id="unknown-environment",
        ),
        pytest.param(
            "{environment: e, execute_steps: [dbt build],"
            " triggers: {schedule: {cron: '0 3 * * *', timezone: Europe/Paris}}}",
            "schedules in UTC",
            id="timezone",
        ),
        pytest.param(
            "{environment: e, execute_steps: [ls]}", "a step must be a dbt command", id="not-dbt"
        ),
        pytest.param(
            "{environment: e, execute_steps: [dbt build], deactivate_after_failures: 3}",
            "deactivate_after_failures",
            id="api-cannot-set",
        ),
    ],
)
def test_an_invalid_file_names_the_problem(tmp_path: Path, job: str, problem: str) -> None:
    text = "environments: {e: {project_dir: /p}}\njobs: {j: {name: J, " + job[1:] + "}\n"
    with pytest.raises(JobsFileError, match=problem):
        load_jobs_file(write(tmp_path, text))


def test_a_job_body_means_to_the_api_the_job_of_the_file(tmp_path: Path) -> None:
    spec = load_jobs_file(
        write(
            tmp_path,
            "account: {account_id: '5'}\n"
            "environments: {e: {project_dir: /p, target_name: prod}}\n"
            "jobs:\n"
            "  - job_id: up\n"
            "    name: Up\n"
            "    environment: e\n"
            "    execute_steps: [dbt seed, \"dbt run --vars '{a: 1}'\"]\n"
            "    generate_docs: true\n"
            "    settings: {threads: 8, target_name: ci}\n"
            "    timeout_seconds: 600\n"
            "    triggers: {schedule: {cron: '*/5 * * * *'}}\n"
            "  - job_id: down\n"
            "    name: Down\n"
            "    environment: e\n"
            "    execute_steps: [dbt build]\n"
            "    triggers: {on_job_completion: [{job_id: up, statuses: [10, 20]}]}\n",
        )
    )
    ids = {"up": 41, "down": 42}
    for planned in spec.jobs:
        job = planned.definition
        upstream = job.triggers.on_job_completion
        body = job_body(
            job,
            project_id=1,
            environment_id=3,
            upstream_id=ids[upstream[0].job_id] if upstream else None,
        )
        rebuilt = build_definition(
            parse_job(body),
            account_id="5",
            key=job.job_id,
            environment=job.environment,
            upstream_key={v: k for k, v in ids.items()}.get,
        )
        assert rebuilt == job


def test_differs_compares_only_what_the_file_sends() -> None:
    current = {"name": "a", "settings": {"threads": 4, "target_name": "x"}, "execute_steps": [
        "dbt run --vars '{a: 1}'"
    ]}  # fmt: skip
    assert not differs(current, {"settings": {"threads": 4}})
    assert not differs(current, {"execute_steps": ["dbt run --vars '{a: 1}'"]})
    assert differs(current, {"settings": {"threads": 8}})
    assert differs(current, {"description": "new"})


def test_apply_refuses_a_completion_trigger_on_a_job_nowhere_to_be_found(tmp_path: Path) -> None:
    spec = load_jobs_file(
        write(
            tmp_path,
            "environments: {e: {project_dir: /p}}\n"
            "jobs:\n"
            "  - {job_id: j, name: J, environment: e, execute_steps: [dbt build],\n"
            "     triggers: {on_job_completion: [{job_id: ghost}]}}\n",
        )
    )

    class NoJobs:
        account_id = "1"

        def list_environments(self, project_id: int) -> list[object]:
            return []

        def put_environment(self, project_id: int, name: str, body: object) -> dict[str, int]:
            return {"id": 1}

        def all_jobs(self) -> list[object]:
            return []

    with pytest.raises(Exception, match="job j runs after job ghost"):
        apply_jobs_file(NoJobs(), spec)  # type: ignore[arg-type]


def test_log_tail_prints_each_line_once_and_places_a_truncated_tail(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tail = LogTail()

    def run(logs: str, size: int | None = None, status: RunStatus = RunStatus.RUNNING) -> dict:  # type: ignore[type-arg]
        step = {"index": 1, "name": "dbt seed", "status": int(status), "logs": logs}
        if size is not None:
            step["log_size"] = size
        return {"run_steps": [step]}

    tail.feed(run("one\ntw"), final=False)
    tail.feed(run("one\ntwo\nthree\n"), final=False)
    # The API now sends only the last 6 bytes of a 21-byte log: byte 15 was never seen.
    tail.feed(run("\nfour\n", size=21), final=False)
    tail.feed(run("\nfour\nfive", size=25, status=RunStatus.SUCCESS), final=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "── step 1: dbt seed", "one", "two", "three",
        "... 1 bytes of log skipped ...", "", "four", "five",
    ]  # fmt: skip
