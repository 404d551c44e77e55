"""The ``runslot`` command itself, without a stack: how it is organized and how it fails
when there is nothing to talk to."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from starter.cli import app

NO_API: dict[str, str | None] = {
    "RUNSLOT_API_URL": None,
    "RUNSLOT_API_TOKEN": None,
    "RUNSLOT_ACCOUNT": None,
}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again when the block ends: nothing listens there


def test_runslot_api_is_the_api_server_with_its_own_options() -> None:
    result = CliRunner().invoke(app, ["api", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--temporal-address", "--data-dir", "--store-url", "--port", "--ssl-certfile"):
        assert option in result.stdout


def test_client_commands_say_what_is_missing_in_one_line() -> None:
    runner = CliRunner()
    no_token = runner.invoke(app, ["jobs", "list"], env=NO_API)
    assert no_token.exit_code == 1
    assert no_token.stderr.startswith("error: no API token: pass --token or set RUNSLOT_API_TOKEN")
    no_account = runner.invoke(app, ["runs", "list", "--token", "t"], env=NO_API)
    assert no_account.exit_code == 1
    assert no_account.stderr.strip() == "error: no account: pass --account or set RUNSLOT_ACCOUNT"
    url = f"http://127.0.0.1:{closed_port()}"
    down = runner.invoke(
        app, ["runs", "get", "1", "--api-url", url, "--token", "t", "--account", "1"], env=NO_API
    )
    assert down.exit_code == 1
    assert down.exception is None or isinstance(down.exception, SystemExit)  # no traceback
    assert down.stderr.startswith(f"error: cannot reach the API at {url}")
    assert len(down.stderr.strip().splitlines()) == 1


def test_a_bad_status_name_lists_the_good_ones() -> None:
    result = CliRunner().invoke(
        app, ["runs", "list", "--status", "done", "--token", "t", "--account", "1"], env=NO_API
    )
    assert result.exit_code == 1
    assert "unknown run status 'done'" in result.stderr and "Cancelled" in result.stderr
