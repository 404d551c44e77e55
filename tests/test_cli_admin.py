"""The admin commands on a real run store (SQLite in a temp dir): accounts, tokens,
environments, webhooks and the derived secrets. No API or Temporal involved: these commands
write the store directly, because they create the credentials the API checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from activities import signing
from activities.secrets import EnvSecrets
from activities.store import RunStore
from starter.cli import app

ROOT = Path(__file__).resolve().parent.parent


class Admin:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.store_url = f"sqlite:///{data_dir / 'runslot.db'}"

    def __call__(self, *args: str, store: bool = True) -> Result:
        where = ["--data-dir", str(self.data_dir)]
        if store:
            where += ["--store-url", self.store_url]
        env: dict[str, str | None] = {
            "RUNSLOT_STORE_URL": None,
            "RUNSLOT_SECRET_RUNSLOT_SIGNING_KEY": None,
        }
        return CliRunner().invoke(app, [*args, *where], env=env)

    def ok(self, *args: str, store: bool = True) -> Result:
        result = self(*args, store=store)
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--output", "json").stdout)

    def fails(self, *args: str, store: bool = True) -> str:
        result = self(*args, store=store)
        assert result.exit_code == 1, (result.stdout, result.stderr)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(tmp_path)


@pytest.fixture
def store(admin: Admin) -> RunStore:
    return RunStore(admin.store_url)


def test_accounts_create_then_update_keeps_the_limits_not_given(admin: Admin) -> None:
    created = admin.json("accounts", "create", "7", "--name", "Seven", "--run-slots", "3")
    assert (created["id"], created["name"], created["run_slots"]) == ("7", "Seven", 3)
    updated = admin.json(
        "accounts", "create", "7", "--memory-limit-mb", "512", "--max-queue-wait-seconds", "90"
    )
    assert updated["name"] == "Seven" and updated["run_slots"] == 3
    assert updated["run_memory_limit_mb"] == 512 and updated["max_queue_wait_seconds"] == 90


def test_tokens_create_prints_a_token_of_the_account_once(admin: Admin, store: RunStore) -> None:
    admin.ok("accounts", "create", "7")
    result = admin.ok("tokens", "create", "7", "--name", "ci")
    token = result.stdout.strip()
    assert store.account_for_token(token) == "7"
    assert token not in result.stderr
    assert "does not exist" in admin.fails("tokens", "create", "8")


def test_environments_create_resolves_paths_and_reads_profile_values(
    admin: Admin, store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    admin.ok("accounts", "create", "7")
    made = admin.json(
        "environments", "create", "7", "prod", "--project-dir", "sample/jaffle",
        "--profile", "type=duckdb", "--profile", "path=wh.duckdb", "--profile", "threads=4",
        "--env-var", "DBT_X=1",
    )  # fmt: skip
    env = store.get_environment("7", made["id"])
    assert env is not None and env.name == "prod" and env.project_id == 1
    assert env.definition.project_dir == str(ROOT / "sample" / "jaffle")
    assert env.definition.profile == {
        "type": "duckdb",
        "path": str(ROOT / "wh.duckdb"),
        "threads": 4,
    }
    assert env.definition.env_vars == {"DBT_X": "1"}
    again = admin.json("environments", "create", "7", "prod", "--git-url", "https://x/y.git")
    assert again["id"] == made["id"]  # replaced by name, same id
    assert "project_dir" in admin.fails("environments", "create", "7", "empty")
    assert "KEY=VALUE" in admin.fails(
        "environments", "create", "7", "p2", "--project-dir", "x", "--profile", "nope"
    )


def test_webhooks_create_list_and_deliveries_with_the_derived_secret(
    admin: Admin, store: RunStore
) -> None:
    admin.ok("accounts", "create", "7")
    hook = admin.json(
        "webhooks", "create", "7", "--url", "https://example.invalid/hook",
        "--event", "job.run.errored", "--job", "12",
    )  # fmt: skip
    key = signing.server_key(admin.data_dir, EnvSecrets(environ={}))
    assert hook["secret"] == signing.webhook_secret(key, hook["id"])
    listed = admin.json("webhooks", "list", "7")
    assert [(h["id"], h["event_types"], h["job_ids"]) for h in listed] == [
        (hook["id"], ["job.run.errored"], [12])
    ]
    assert "unknown event type" in admin.fails(
        "webhooks", "create", "7", "--url", "https://x", "--event", "job.run.nope"
    )
    assert admin.json("webhooks", "deliveries", "7") == []
    store.record_delivery_attempt(
        webhook_id=hook["id"], account_id="7", event_id="e1", event_type="job.run.errored",
        run_id=3, status_code=500, error="boom", succeeded=False,
    )  # fmt: skip
    (delivery,) = admin.json("webhooks", "deliveries", "7", "--webhook", str(hook["id"]))
    assert (delivery["event_id"], delivery["attempts"], delivery["succeeded"]) == ("e1", 1, False)
    text = admin.ok("webhooks", "deliveries", "7").stdout
    assert "job.run.errored" in text


def test_github_secret_is_the_one_the_api_derives(admin: Admin) -> None:
    printed = admin.ok("github-secret", "7", store=False).stdout.strip()
    key = signing.server_key(admin.data_dir, EnvSecrets(environ={}))
    assert printed == signing.github_secret(key, "7")


def test_admin_commands_name_the_missing_store(tmp_path: Path) -> None:
    admin = Admin(tmp_path / "nowhere")
    assert "no run store at" in admin.fails("accounts", "create", "7", store=False)
