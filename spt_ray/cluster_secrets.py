"""Credentials in a cluster config (cluster-launcher YAML or Kubernetes manifests): Ray checks none of this.

A config is shared and committed; a key in it (even in a comment) leaks. Keys whose names sound secret
with literal values, well-known token shapes anywhere in the text, and KEY=value / --token value in
commands are refused. `$VAR` references are not secrets: the value stays in the node's environment;
neither are Kubernetes `valueFrom: secretKeyRef` entries (only a literal `value` is refused).
Messages name the field or line, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Callable

SECRET_KEY = re.compile(r"secret|passw(?:or)?d|token|api[_-]?key|access[_-]?key|credential|private[_-]?key",
                        re.IGNORECASE)
# Keys whose names sound secret but whose values are names or paths (the key material stays elsewhere).
NOT_SECRET_KEYS = {"ssh_private_key", "ssh_public_key", "KeyName", "ClientToken", "HttpTokens"}
# Patterns that are credentials wherever they appear, comments included.
SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("private key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")),
    ("Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("API key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")),
)
# KEY=value (a shell assignment: no spaces around =) and --flag value / --flag=value with a secret-sounding name.
SECRET_ASSIGNMENT = re.compile(
    r"\b([A-Za-z0-9_]*(?:SECRET|PASSWORD|PASSWD|TOKEN|API_?KEY|ACCESS_KEY)[A-Za-z0-9_]*)=[\"']?([^\s\"'$;&|][^\s\"';&|]*)",
    re.IGNORECASE)
SECRET_FLAG = re.compile(r"--([\w-]*(?:password|passwd|token|secret|api[-_]?key)[\w-]*)(?:=|\s+)[\"']?([^\s\"'$-][^\s\"']*)",
                         re.IGNORECASE)
SECRET_FIX = ("delete it (and rotate it): nodes get cloud access from their instance profile, `ray up` uses "
              "your machine's credentials, and other tokens belong in the environment or a secrets manager")


def _is_reference(value: str) -> bool:
    """`$VAR` / `${VAR}` names a variable of the node's environment; it is not a literal secret."""
    return value.startswith("$")


def _secret_in_string(text: str) -> str | None:
    for kind, pattern in SECRET_PATTERNS:
        if pattern.search(text):
            return kind
    for pattern in (SECRET_ASSIGNMENT, SECRET_FLAG):
        for match in pattern.finditer(text):
            name = match.group(1).lower()
            if name.endswith(("file", "path", "dir", "env", "mode")):  # --token-file=..., RAY_AUTH_MODE
                continue
            return f"literal value for {match.group(1)}"
    return None


def _walk(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any, Any]]:
    """Yield (path, key, value) for every mapping entry and list item, depth first."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield path + (key,), key, item
            yield from _walk(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield path + (index,), None, item
            yield from _walk(item, path + (index,))


def check_secrets(raw: Any, text: str, label: str, error: Callable[[str, str, str], Exception],
                  field: Callable[[tuple[Any, ...]], str]) -> None:
    """Raise `error(label, what, fix)` for the first secret in the parsed config `raw` or its `text`."""
    for path, key, value in _walk(raw):
        if (isinstance(key, str) and key not in NOT_SECRET_KEYS and SECRET_KEY.search(key)
                and isinstance(value, (str, int, float)) and not isinstance(value, bool)
                and str(value).strip() and not _is_reference(str(value).strip())):
            raise error(label, f"{field(path)} holds a secret", SECRET_FIX)
        if (isinstance(value, Mapping) and isinstance(value.get("name"), str) and SECRET_KEY.search(value["name"])
                and isinstance(value.get("value"), (str, int, float)) and str(value["value"]).strip()
                and not _is_reference(str(value["value"]).strip())):  # Kubernetes `env: [{name, value}]`
            raise error(label, f"{field(path)} ({value['name']}) holds a secret", SECRET_FIX)
        if isinstance(value, str):
            kind = _secret_in_string(value)
            if kind:
                raise error(label, f"{field(path)} contains what looks like a secret ({kind})", SECRET_FIX)
    # Comments never reach the parsed config but are still in the file that gets shared and committed.
    for number, line in enumerate(text.splitlines(), start=1):
        for kind, pattern in SECRET_PATTERNS:
            if pattern.search(line):
                raise error(label, f"line {number} contains what looks like a secret ({kind})", SECRET_FIX)
