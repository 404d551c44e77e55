"""Secret references: resolved only by prep, written only to private workspace files, masked
in logs, and named (never shown) in errors. End to end with dbt and Temporal:
tests/test_local_executor.py."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from temporalio.exceptions import ApplicationError

from activities.local import ENV_FILE, RUN_FILE, LocalExecutor, LocalExecutorSettings
from activities.secrets import (
    EnvSecrets,
    FileSecrets,
    MalformedReferenceError,
    Redactor,
    SecretSourceError,
    UnknownSecretError,
    references,
    resolve_config,
    worker_secrets,
)
from workflows.models import CleanupInput, Environment, PrepareInput

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "jaffle"
PASSWORD = "pw-7c1d-do-not-leak"
TOKEN = "tok-93ab-do-not-leak"


def test_references_are_found_with_either_quote_and_any_spacing() -> None:
    text = "a {{ secret('ONE') }} b {{secret(\"TWO\")}} c {{  secret( 'THREE' )  }}"
    assert references(text) == ["ONE", "TWO", "THREE"]
    assert references("{{ env_var('X') }}") == []


@pytest.mark.parametrize(
    "value",
    ["{{ secret(NAME) }}", "{{ secret('bad-name') }}", "{{ 'x' ~ secret('A') }}"],
    ids=["unquoted", "bad-name", "expression"],
)
def test_a_malformed_reference_is_an_error_saying_where_it_is(value: str) -> None:
    with pytest.raises(MalformedReferenceError, match="profile field 'password'"):
        resolve_config({"password": value}, {}, EnvSecrets(environ={}))


def test_profile_secrets_reach_dbt_as_dbt_env_secret_variables() -> None:
    resolver = EnvSecrets(environ={"RUNSLOT_SECRET_PW": PASSWORD, "RUNSLOT_SECRET_TOK": TOKEN})
    config = resolve_config(
        {"type": "postgres", "password": "{{ secret('PW') }}", "port": 5432},
        {"API_URL": "https://x:{{ secret('TOK') }}@api", "PLAIN": "1"},
        resolver,
    )
    # Never rendered through dbt's Jinja: a '{{' in a password stays a password.
    assert config.profile == {
        "type": "postgres",
        "password": "{{ env_var('DBT_ENV_SECRET_PW') }}",
        "port": 5432,
    }
    assert config.env == {
        "API_URL": f"https://x:{TOKEN}@api",
        "PLAIN": "1",
        "DBT_ENV_SECRET_PW": PASSWORD,
    }
    assert sorted(config.secret_values) == sorted([PASSWORD, TOKEN])


def test_an_unknown_secret_is_named_and_no_value_is_shown() -> None:
    resolver = EnvSecrets(environ={"RUNSLOT_SECRET_PW": PASSWORD})
    with pytest.raises(UnknownSecretError) as info:
        resolve_config(
            {"password": "{{ secret('PW') }}"}, {"KEY": "{{ secret('MISSING') }}"}, resolver
        )
    assert "'MISSING'" in str(info.value) and "env var 'KEY'" in str(info.value)
    assert "RUNSLOT_SECRET_MISSING" in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [json.dumps({"PW": PASSWORD}), f"PW: '{PASSWORD}'\n"],
    ids=["json", "yaml"],
)
def test_the_secrets_file_may_be_json_or_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "secrets"
    path.write_text(text)
    assert FileSecrets(path).lookup("PW") == PASSWORD
    assert FileSecrets(path).lookup("OTHER") is None


def test_the_worker_environment_overrides_the_secrets_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets.yml"
    path.write_text(f"PW: file-value\nTOK: {TOKEN}\n")
    resolver = worker_secrets(path, environ={"RUNSLOT_SECRET_PW": PASSWORD})
    assert (resolver.lookup("PW"), resolver.lookup("TOK")) == (PASSWORD, TOKEN)


def test_the_secrets_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"PW": "old-value"}))
    secrets = FileSecrets(path)
    assert secrets.lookup("PW") == "old-value"
    path.write_text(json.dumps({"PW": "rotated-value"}))
    assert secrets.lookup("PW") == "rotated-value"


@pytest.mark.parametrize(
    ("text", "message"),
    [("PW: 123456\n", "'PW' .* must be a string"), ("- a\n", "mapping"), (None, "cannot read")],
    ids=["number", "list", "missing"],
)
def test_a_bad_secrets_file_is_a_source_error_without_values(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "secrets.yml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SecretSourceError, match=message) as info:
        FileSecrets(path).lookup("PW")
    assert "123456" not in str(info.value)


def test_the_redactor_masks_values_of_four_characters_or_more() -> None:
    redactor = Redactor(["abc", "abcd", "abcdef", "line one\nline two"])
    assert redactor.redact(b"abc abcd abcdef") == b"abc ***** *****"
    assert redactor.redact(b"[line one] [line two]") == b"[*****] [*****]"
    assert redactor.redact_text('{"password": "abcdef"}') == '{"password": "*****"}'
    assert Redactor([]).redact(b"nothing to hide") == b"nothing to hide"


def test_a_value_as_json_escapes_it_is_masked_too() -> None:
    assert Redactor(['pa"ss\\word']).redact(b'"pa\\"ss\\\\word"') == b'"*****"'


# --------------------------------------------------------------------------- prep


def _executor(tmp_path: Path, secrets: dict[str, str]) -> LocalExecutor:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps(secrets))
    path.chmod(0o600)
    settings = LocalExecutorSettings(workspace_root=tmp_path / "ws", secrets_file=path)
    return LocalExecutor(settings)


def _request(**env: object) -> PrepareInput:
    environment = Environment.model_validate(
        {
            "project_dir": str(SAMPLE),
            "profile": {"type": "duckdb", "path": ":memory:", "password": "{{ secret('PW') }}"},
            **env,
        }
    )
    return PrepareInput(
        account_id="acme", job_id="j", run_id="r1", environment=environment,
        target_name="default", threads=1,
    )  # fmt: skip


async def test_prep_writes_secret_values_only_to_private_files_and_cleanup_removes_them(
    tmp_path: Path,
) -> None:
    executor = _executor(tmp_path, {"PW": PASSWORD, "TOK": TOKEN})
    request = _request(env_vars={"JAFFLE_TOKEN": "{{ secret('TOK') }}"})
    prepared = await executor.prepare(request)
    workspace = Path(prepared.workspace)
    profiles = workspace / "profiles" / "profiles.yml"
    for private in (profiles, workspace / ENV_FILE, workspace / RUN_FILE):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert PASSWORD not in profiles.read_text()
    output = yaml.safe_load(profiles.read_text())["jaffle"]["outputs"]["default"]
    assert output["password"] == "{{ env_var('DBT_ENV_SECRET_PW') }}"
    assert json.loads((workspace / ENV_FILE).read_text())["JAFFLE_TOKEN"] == TOKEN
    # What crosses Temporal keeps the references and never holds a value.
    wire = request.model_dump_json() + prepared.model_dump_json()
    assert "{{ secret('PW') }}" in wire and "{{ secret('TOK') }}" in wire
    assert PASSWORD not in wire and TOKEN not in wire
    await executor.cleanup(CleanupInput(account_id="acme", run_id="r1", workspace=str(workspace)))
    assert not workspace.exists()


async def test_an_unknown_secret_fails_prep_at_once_naming_it(tmp_path: Path) -> None:
    executor = _executor(tmp_path, {"PW": PASSWORD})
    with pytest.raises(ApplicationError) as info:
        await executor.prepare(_request(env_vars={"KEY": "{{ secret('NOT_DEFINED') }}"}))
    assert info.value.non_retryable
    assert "unknown secret 'NOT_DEFINED'" in info.value.message
    assert PASSWORD not in info.value.message
    assert not (tmp_path / "ws" / "acme" / "r1").exists(), "nothing is prepared"


async def test_an_unreadable_secrets_file_is_a_retryable_prep_error(tmp_path: Path) -> None:
    settings = LocalExecutorSettings(
        workspace_root=tmp_path / "ws", secrets_file=tmp_path / "absent.json"
    )
    with pytest.raises(ApplicationError, match="cannot read the secrets file") as info:
        await LocalExecutor(settings).prepare(_request())
    assert not info.value.non_retryable
