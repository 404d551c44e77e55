"""Secrets: references everywhere, values only on the worker that prepares a run.

A profile field or an env var value may be a reference, ``"{{ secret('NAME') }}"`` (alone or
inside a longer string). References cross Temporal verbatim; the prepare activity resolves
them with a ``SecretResolver`` (a worker-side file and/or ``RUNSLOT_SECRET_*`` variables)
when it writes profiles.yml and the step env file. Profile secrets reach dbt as
``DBT_ENV_SECRET_{NAME}`` variables read by ``env_var()`` in profiles.yml: no secret value is
ever rendered through dbt's Jinja (a ``{{`` inside a password stays a password), and dbt
scrubs those variables from its own output too. ``Redactor`` masks every resolved value in
the logs Runslot stores.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import yaml

SECRET_ENV_PREFIX = "RUNSLOT_SECRET_"  # noqa: S105 - a variable name prefix, not a secret
DBT_SECRET_PREFIX = "DBT_ENV_SECRET_"  # noqa: S105 - dbt's prefix for variables it scrubs
MASK = "*****"
MIN_REDACTED_LENGTH = 4
"""Shorter values are not masked: masking every "1" or "abc" would garble the logs."""

_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
_REFERENCE = re.compile(r"\{\{\s*secret\(\s*(['\"])(" + _NAME + r")\1\s*\)\s*\}\}")
_CALLS_SECRET = re.compile(r"\{\{[^{}]*\bsecret\s*\(")


class SecretError(Exception):
    """A secret reference cannot be resolved. Messages name secrets, never values."""


class UnknownSecretError(SecretError):
    def __init__(self, name: str, where: str) -> None:
        super().__init__(
            f"unknown secret {name!r} (referenced by {where}): define it in the worker's "
            f"secrets file or as the worker environment variable {SECRET_ENV_PREFIX}{name}"
        )
        self.name = name


class MalformedReferenceError(SecretError):
    def __init__(self, where: str) -> None:
        super().__init__(
            f"malformed secret reference in {where}: write it as \"{{{{ secret('NAME') }}}}\" "
            "with NAME made of letters, digits and '_'"
        )


class SecretSourceError(SecretError):
    """The worker's secrets file cannot be read: a worker problem, worth a retry."""


class SecretResolver(Protocol):
    """Where a worker finds secret values by name."""

    def lookup(self, name: str) -> str | None:
        """The secret's value, or None when this resolver does not know the name."""
        ...


class EnvSecrets:
    """Secrets from environment variables named ``{prefix}{NAME}``."""

    def __init__(
        self, prefix: str = SECRET_ENV_PREFIX, environ: Mapping[str, str] | None = None
    ) -> None:
        self._prefix = prefix
        self._environ = os.environ if environ is None else environ

    def lookup(self, name: str) -> str | None:
        return self._environ.get(self._prefix + name)


class FileSecrets:
    """Secrets from a JSON or YAML mapping of name to value, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._values: dict[str, str] = {}

    def lookup(self, name: str) -> str | None:
        return self._load().get(name)

    def _load(self) -> dict[str, str]:
        try:
            stat = self._path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return self._values
            data = yaml.safe_load(self._path.read_text())  # YAML reads JSON too
        except (OSError, yaml.YAMLError) as err:
            detail = type(err).__name__ if isinstance(err, yaml.YAMLError) else err.strerror
            raise SecretSourceError(
                f"cannot read the secrets file {self._path}: {detail}"
            ) from None
        values = _check_mapping(data or {}, self._path)
        self._stamp, self._values = stamp, values
        return values


def _check_mapping(data: object, path: Path) -> dict[str, str]:
    if not isinstance(data, dict):
        raise SecretSourceError(f"the secrets file {path} must be a mapping of name to value")
    for name, value in data.items():
        if not isinstance(name, str) or not re.fullmatch(_NAME, name):
            raise SecretSourceError(f"the secrets file {path} has an invalid name: {name!r}")
        if not isinstance(value, str):
            raise SecretSourceError(
                f"secret {name!r} in {path} must be a string (quote it in YAML)"
            )
    return dict(data)


class ChainSecrets:
    """The first resolver that knows a name wins."""

    def __init__(self, *resolvers: SecretResolver) -> None:
        self._resolvers = resolvers

    def lookup(self, name: str) -> str | None:
        for resolver in self._resolvers:
            value = resolver.lookup(name)
            if value is not None:
                return value
        return None


def worker_secrets(
    secrets_file: Path | None,
    prefix: str = SECRET_ENV_PREFIX,
    environ: Mapping[str, str] | None = None,
) -> SecretResolver:
    """Environment variables first (an operator override), then the secrets file."""
    env = EnvSecrets(prefix, environ)
    return env if secrets_file is None else ChainSecrets(env, FileSecrets(secrets_file))


def references(text: str) -> list[str]:
    """Names of the secrets ``text`` refers to, in order."""
    return [match.group(2) for match in _REFERENCE.finditer(text)]


def substitute(text: str, where: str, replacement: Callable[[str], str]) -> str:
    """Replace each reference by ``replacement(name)``; a malformed one is an error."""
    if len(_CALLS_SECRET.findall(text)) != len(references(text)):
        raise MalformedReferenceError(where)
    return _REFERENCE.sub(lambda match: replacement(match.group(2)), text)


@dataclass
class ResolvedConfig:
    """What the prepare activity writes: never sent back through Temporal."""

    profile: dict[str, str | int | bool]
    """Profile fields with references turned into ``env_var('DBT_ENV_SECRET_NAME')``."""
    env: dict[str, str]
    """The step environment: env var values resolved, plus one DBT_ENV_SECRET_ per secret."""
    secret_values: list[str] = field(default_factory=list)


def resolve_config(
    profile: Mapping[str, str | int | bool],
    env_vars: Mapping[str, str],
    resolver: SecretResolver,
) -> ResolvedConfig:
    """Resolve every reference in a profile and a step environment."""
    used: dict[str, str] = {}

    def value_of(name: str, where: str) -> str:
        if name not in used:
            value = resolver.lookup(name)
            if value is None:
                raise UnknownSecretError(name, where)
            used[name] = value
        return used[name]

    def env_reference(name: str, where: str) -> str:
        value_of(name, where)  # resolved now: an unknown name fails the prep, not dbt
        return "{{ env_var('" + DBT_SECRET_PREFIX + name + "') }}"

    rendered: dict[str, str | int | bool] = {}
    for key, value in profile.items():
        where = f"profile field {key!r}"
        rendered[key] = (
            substitute(value, where, partial(env_reference, where=where))
            if isinstance(value, str)
            else value
        )
    secret_env = {DBT_SECRET_PREFIX + name: value for name, value in used.items()}
    env: dict[str, str] = {}
    for name, value in env_vars.items():
        where = f"env var {name!r}"
        env[name] = substitute(value, where, partial(value_of, where=where))
    return ResolvedConfig(
        profile=rendered, env={**env, **secret_env}, secret_values=list(used.values())
    )


class Redactor:
    """Masks secret values (``MIN_REDACTED_LENGTH`` characters or more) in output bytes."""

    def __init__(self, values: Iterable[str], min_length: int = MIN_REDACTED_LENGTH) -> None:
        needles: set[bytes] = set()
        for value in values:
            # The value, each line of a multi-line value (output is split into lines), and
            # the value as JSON escapes it (dbt's structured logs).
            for variant in (value, *value.splitlines(), json.dumps(value)[1:-1]):
                if len(variant) >= min_length:
                    needles.add(variant.encode())
        ordered = sorted(needles, key=len, reverse=True)  # the longest match wins
        self._pattern = re.compile(b"|".join(map(re.escape, ordered))) if ordered else None
        self.overlap = max(map(len, ordered), default=1) - 1
        """Bytes at the end of a chunk that may hold the start of a secret."""

    def redact(self, data: bytes) -> bytes:
        return data if self._pattern is None else self._pattern.sub(MASK.encode(), data)

    def redact_text(self, text: str) -> str:
        return self.redact(text.encode()).decode(errors="replace")
