"""Admin commands: accounts, tokens, environments, webhooks, the GitHub secret.

They write the run store directly, not through the API: they create the credentials the
API checks (a token cannot mint the first token), so they need the store itself
(``--data-dir`` for the SQLite default, or ``--store-url``), as the workers and the API do.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from pydantic import ValidationError
from rich.markup import escape
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.store import RunStore, StoredAccount, UnknownAccountError
from starter import jobs
from starter.admin import save_account
from starter.cli_common import (
    DEFAULT_ADDRESS,
    CliError,
    Namespace,
    Output,
    OutputFormat,
    TemporalAddress,
    err,
    new_table,
    out,
    print_json,
    print_tables,
    text,
    user_errors,
    when,
)
from starter.client import connect
from starter.jobs_file import resolve_paths
from worker.settings import STORE_FILE
from workflows.constants import WEBHOOK_EVENT_TYPES
from workflows.models import AccountSettings, Environment

DataDir = Annotated[
    Path,
    typer.Option(help="Data dir of the stack (its SQLite run store).", rich_help_panel="Store"),
]
StoreUrl = Annotated[
    str | None,
    typer.Option(
        envvar="RUNSLOT_STORE_URL",
        help="Run store database URL (default: the SQLite file in --data-dir).",
        show_default=False,
        rich_help_panel="Store",
    ),
]
AccountArg = Annotated[str, typer.Argument(help="Account id.", show_default=False)]
DEFAULT_DATA_DIR = Path(".runslot")

accounts_app = typer.Typer(help="Accounts and their limits.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens.", no_args_is_help=True)
environments_app = typer.Typer(
    help="Environments: where a job's dbt project lives and how it runs.", no_args_is_help=True
)
webhooks_app = typer.Typer(
    help="Outgoing webhooks (job.run.started/completed/errored) and their delivery log.",
    no_args_is_help=True,
)


def open_store(data_dir: Path, store_url: str | None) -> RunStore:
    """The run store, migrated to this release's schema (a no-op when it is already)."""
    if store_url is None:
        db_file = data_dir / STORE_FILE
        if not db_file.exists():
            raise CliError(
                f"no run store at {db_file}: pass the stack's --data-dir (start `runslot dev` "
                "or a worker once to create it) or --store-url"
            )
        store_url = f"sqlite:///{db_file.resolve()}"
    try:
        store = RunStore(store_url)
        store.migrate()
    except sa.exc.SQLAlchemyError as error:
        shown = sa.make_url(store_url).render_as_string(hide_password=True)
        name = error.__class__.__name__
        raise CliError(f"cannot open the run store at {shown}: {name}") from None
    return store


@contextmanager
def account_store(account_id: str, data_dir: Path, store_url: str | None) -> Iterator[RunStore]:
    """``open_store`` for one account's commands, closed after the block; a write to an
    account the store does not have is a ``CliError`` that says how to create it."""
    store = open_store(data_dir, store_url)
    try:
        yield store
    except UnknownAccountError:
        raise _unknown_account(account_id) from None
    finally:
        store.close()


def _unknown_account(account_id: str) -> CliError:
    return CliError(f"account {account_id} does not exist (runslot accounts create {account_id})")


def _account(store: RunStore, account_id: str) -> StoredAccount:
    found = store.get_account(account_id)
    if found is None:
        raise _unknown_account(account_id)
    return found


# --------------------------------------------------------------------------- accounts


@accounts_app.command("create")
def accounts_create(
    account_id: AccountArg,
    *,
    name: Annotated[str | None, typer.Option(help="Display name (default: the id).")] = None,
    run_slots: Annotated[
        int | None, typer.Option(min=0, max=1000, help="Runs that may execute at once.")
    ] = None,
    memory_limit_mb: Annotated[
        int | None, typer.Option(min=16, help="Memory limit of one run's dbt processes.")
    ] = None,
    max_queue_wait_seconds: Annotated[
        int | None, typer.Option(min=1, help="A run queued longer than this is cancelled.")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    temporal_address: TemporalAddress = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
    output: Output = OutputFormat.TEXT,
) -> None:
    """Create an account, or update the limits given (others are kept).

    A new --run-slots also resizes the account's slots workflow when it runs (at once:
    growing grants waiting runs, shrinking kills nothing).
    """
    with user_errors(), account_store(account_id, data_dir, store_url) as store:
        existing = store.get_account(account_id)
        base: dict[str, Any] = (
            existing.settings.model_dump() if existing else {"account_id": account_id}
        )
        given = {
            "run_slots": run_slots,
            "run_memory_limit_mb": memory_limit_mb,
            "max_queue_wait": (
                timedelta(seconds=max_queue_wait_seconds) if max_queue_wait_seconds else None
            ),
        }
        try:
            settings = AccountSettings.model_validate(
                {**base, **{k: v for k, v in given.items() if v is not None}}
            )
        except ValidationError as error:
            raise CliError(f"invalid account: {_first_error(error)}") from None
        save_account(store, settings, name)
        saved = _account(store, account_id)
    resized = None
    if existing is not None and run_slots is not None:
        resized = _resize_slots(account_id, run_slots, temporal_address, namespace)
    if output == OutputFormat.JSON:
        print_json(saved.model_dump(mode="json", exclude={"settings"}))
        return
    verb = "updated" if existing else "created"
    limit = f"{saved.run_memory_limit_mb} MB" if saved.run_memory_limit_mb else "none"
    out.print(
        f"Account [bold]{text(saved.id)}[/] ({text(saved.name)}) {verb}: "
        f"{saved.run_slots} run slot(s), memory limit {limit}, "
        f"max queue wait {saved.max_queue_wait_seconds}s"
    )
    if resized:
        out.print(resized)


def _resize_slots(account_id: str, capacity: int, address: str, namespace: str) -> str | None:
    """Resize the account's running slots workflow; what happened, for people (or None)."""

    async def resize() -> str | None:
        try:
            client = await connect(address, namespace)
        except RuntimeError:
            return (
                f"[yellow]note:[/] Temporal at {address} is not reachable: the account's "
                "running slots workflow (if any) keeps its capacity until resized"
            )
        try:
            before = (await jobs.describe_slots(client, account_id)).capacity
            if before == capacity:
                return None
            await jobs.resize_slots(client, account_id, capacity)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return None  # no slots workflow yet: it starts with the account's runs
            return f"[yellow]note:[/] the slots workflow was not resized: {escape(str(error))}"
        except WorkflowUpdateFailedError as error:
            cause = escape(str(error.cause or error))
            return f"[yellow]note:[/] the slots workflow refused the resize: {cause}"
        return f"Run slots of account {account_id} resized: {before} -> {capacity}"

    return asyncio.run(resize())


def _first_error(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


# --------------------------------------------------------------------------- tokens


@tokens_app.command("create")
def tokens_create(
    account_id: AccountArg,
    *,
    name: Annotated[str, typer.Option(help="A label for people, e.g. ci.")] = "cli",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
) -> None:
    """Create an API token and print it: its only appearance (the store keeps a digest)."""
    with user_errors(), account_store(account_id, data_dir, store_url) as store:
        token = store.create_token(account_id, name)
    # The token alone on stdout, so TOKEN=$(runslot tokens create 1) works.
    out.print(token)
    err.print(
        f"[dim]Token {text(name)} of account {text(account_id)}: shown once, keep it "
        "(RUNSLOT_API_TOKEN, or Authorization: Token ...)[/]"
    )


# --------------------------------------------------------------------------- environments


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise CliError(f"{option} {value!r}: expected KEY=VALUE")
        pairs[key] = rest
    return pairs


def _scalar(value: str) -> str | int | bool:
    """A profile value: true/false and integers as YAML would read them, else the string."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.lstrip("-").isdigit():
        return int(value)
    return value


@environments_app.command("create")
def environments_create(
    account_id: AccountArg,
    name: Annotated[str, typer.Argument(help="Environment name.", show_default=False)],
    *,
    project_dir: Annotated[
        str | None, typer.Option(help="Local directory of the dbt project.", show_default=False)
    ] = None,
    git_url: Annotated[
        str | None, typer.Option(help="git repository of the project.", show_default=False)
    ] = None,
    subdirectory: Annotated[str, typer.Option(help="Where dbt_project.yml sits.")] = "",
    dbt_version: Annotated[str | None, typer.Option(show_default=False)] = None,
    target_name: Annotated[str, typer.Option(help="target.name")] = "default",
    profile: Annotated[
        list[str] | None,
        typer.Option(
            help="Target field KEY=VALUE (repeat): type=duckdb path=... A secret is "
            "\"{{ secret('NAME') }}\".",
            show_default=False,
        ),
    ] = None,
    env_var: Annotated[
        list[str] | None, typer.Option(help="Step environment KEY=VALUE (repeat).")
    ] = None,
    project_id: Annotated[int, typer.Option(min=1, help="dbt Cloud project id.")] = 1,
    resolve_paths_: Annotated[
        bool,
        typer.Option(
            "--resolve-paths/--no-resolve-paths",
            help="Resolve a relative project dir and duckdb path against the current directory.",
        ),
    ] = True,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Create or replace an environment by name (what a job's environment_id names)."""
    with user_errors():
        try:
            environment = Environment(
                project_dir=project_dir or "",
                git_url=git_url,
                subdirectory=subdirectory,
                dbt_version=dbt_version,
                target_name=target_name,
                profile={k: _scalar(v) for k, v in _pairs(profile or [], "--profile").items()},
                env_vars=_pairs(env_var or [], "--env-var"),
            )
        except ValidationError as error:
            raise CliError(f"invalid environment: {_first_error(error)}") from None
        if resolve_paths_:
            environment = resolve_paths(environment, Path.cwd())
        with account_store(account_id, data_dir, store_url) as store:
            env_id = store.put_environment(account_id, name, environment, project_id=project_id)
    if output == OutputFormat.JSON:
        print_json({"id": env_id, "name": name, "project_id": project_id,
                    "runslot": environment.model_dump(mode="json")})  # fmt: skip
        return
    out.print(
        f"Environment [bold]{text(name)}[/] of account {text(account_id)}: id {env_id} "
        f"(project {project_id})"
    )


# --------------------------------------------------------------------------- signing

SecretsFile = Annotated[
    Path | None,
    typer.Option(
        help="The workers' secrets file, if RUNSLOT_SIGNING_KEY lives there.",
        show_default=False,
        rich_help_panel="Store",
    ),
]


def _signing() -> ModuleType | None:
    """``activities.signing`` when this build has it (it derives webhook secrets)."""
    try:
        return importlib.import_module("activities.signing")
    except ImportError:
        return None


def derived_secret(purpose: str, data_dir: Path, secrets_file: Path | None, subject: Any) -> str:
    """A secret derived from the server key, as the workers and the API derive it.

    The key is ``RUNSLOT_SIGNING_KEY`` (``RUNSLOT_SECRET_RUNSLOT_SIGNING_KEY`` or the secrets
    file), else ``<data_dir>/signing.key``: pass the stack's --data-dir, or the secret.
    """
    signing = _signing()
    if signing is None:
        raise CliError("this build cannot derive signing secrets (no activities.signing)")
    from activities.secrets import worker_secrets  # noqa: PLC0415 - only with signing

    try:
        key = signing.server_key(data_dir, worker_secrets(secrets_file))
    except (signing.SigningKeyError, OSError) as error:
        raise CliError(f"cannot read the signing key: {error}") from None
    derive = signing.webhook_secret if purpose == "webhook" else signing.github_secret
    return str(derive(key, subject))


# --------------------------------------------------------------------------- webhooks


@webhooks_app.command("create")
def webhooks_create(
    account_id: AccountArg,
    *,
    url: Annotated[str, typer.Option(help="Where events are POSTed.", show_default=False)],
    event: Annotated[
        list[str] | None,
        typer.Option(help=f"Event type (repeat): {', '.join(WEBHOOK_EVENT_TYPES)}; default all."),
    ] = None,
    job: Annotated[
        list[int] | None,
        typer.Option(help="Only runs of this job id (repeat); default every job."),
    ] = None,
    name: Annotated[str, typer.Option(help="A label for people.")] = "webhook",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    secrets_file: SecretsFile = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Subscribe a URL to the account's run events (HMAC-signed, retried)."""
    events = list(event or WEBHOOK_EVENT_TYPES)
    with user_errors():
        unknown = sorted(set(events) - set(WEBHOOK_EVENT_TYPES))
        if unknown:
            raise CliError(
                f"unknown event type(s) {', '.join(unknown)}: use {', '.join(WEBHOOK_EVENT_TYPES)}"
            )
        if not url.startswith(("http://", "https://")):
            raise CliError(f"--url {url!r}: expected an http:// or https:// URL")
        with account_store(account_id, data_dir, store_url) as store:
            hook_id = store.create_webhook(
                account_id, name=name, url=url, event_types=events, job_ids=job or []
            )
        secret = derived_secret("webhook", data_dir, secrets_file, hook_id) if _signing() else None
    if output == OutputFormat.JSON:
        print_json({"id": hook_id, "name": name, "url": url, "event_types": sorted(set(events)),
                    "job_ids": sorted(set(job or [])), "secret": secret})  # fmt: skip
        return
    out.print(f"Webhook [bold]{hook_id}[/] of account {text(account_id)}: {text(url)}")
    if secret is not None:
        out.print(f"Signing secret (shown once): [bold]{secret}[/]")


@webhooks_app.command("list")
def webhooks_list(
    account_id: AccountArg,
    *,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """List the account's webhook subscriptions."""
    with user_errors(), account_store(account_id, data_dir, store_url) as store:
        hooks = store.list_webhooks(account_id)
    if output == OutputFormat.JSON:
        print_json([hook.model_dump(mode="json") for hook in hooks])
        return
    table = new_table(f"webhooks ({len(hooks)})", "id", "name", "url", "events", "jobs", "active")
    for hook in hooks:
        table.add_row(
            str(hook.id),
            text(hook.name),
            text(hook.url),
            text(", ".join(hook.event_types)),
            text(", ".join(map(str, hook.job_ids)) or "all"),
            "yes" if hook.active else "[yellow]paused[/]",
        )
    print_tables(table)


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    account_id: AccountArg,
    *,
    webhook: Annotated[
        int | None, typer.Option(help="Only this webhook's.", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """The delivery log: each event sent to each webhook, its attempts and outcome."""
    with user_errors(), account_store(account_id, data_dir, store_url) as store:
        deliveries = store.list_deliveries(account_id, webhook_id=webhook, limit=limit)
    if output == OutputFormat.JSON:
        print_json([d.model_dump(mode="json") for d in deliveries])
        return
    columns = ("id", "webhook", "event", "run", "attempts", "result", "last attempt")
    table = new_table(f"deliveries ({len(deliveries)})", *columns)
    for d in deliveries:
        result = (
            f"[green]{d.status_code}[/]"
            if d.succeeded
            else f"[red]{text(d.status_code or d.error or 'failed')}[/]"
        )
        table.add_row(
            str(d.id), str(d.webhook_id), text(d.event_type), text(d.run_id),
            str(d.attempts), result, when(d.updated_at),
        )  # fmt: skip
    print_tables(table)


def github_secret(
    account_id: AccountArg,
    *,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    secrets_file: SecretsFile = None,
) -> None:
    """Print the secret to paste in the account's GitHub webhook settings."""
    with user_errors():
        secret = derived_secret("github", data_dir, secrets_file, account_id)
    out.print(secret)
