"""Offline validation of Ray cluster-launcher configs (``spt-ray cluster validate FILE``).

`ray up` finds most mistakes only after it has started paying for machines. This module runs Ray's own
schema and preparation (``prepare_config`` + ``validate_config`` from ``ray.autoscaler._private.util``,
which need no cloud access) and turns what Ray raises (a KeyError, a page-long jsonschema error, a click
abort) into one line naming the field and the fix. What Ray does not check, and a sweep depends on, lives
beside it: credentials in the file (spt_ray.cluster_secrets; checked first, never echoed), dashboard
exposure, the package installed on every node and whole resource flags (spt_ray.cluster_checks), and a
key given twice (YAML would keep the last one silently; checked while reading).

Every problem raises :class:`ClusterConfigError` with one line: the file, the field, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from .cluster_checks import check_dashboard, check_project_installed, check_start_flags, integer_fix
from .cluster_secrets import check_secrets

__all__ = ["ClusterConfigError", "validate_cluster_config", "summarize_cluster_config"]

RAY_CONFIG_DOCS = "https://docs.ray.io/en/latest/cluster/vms/references/ray-cluster-configuration.html"


class ClusterConfigError(ValueError):
    """A cluster config that would fail (or be unsafe) on `ray up`; one line naming file, field and fix."""


def _error(label: str, what: str, fix: str) -> ClusterConfigError:
    text = f"{label}: {what}; fix: {fix}"
    return ClusterConfigError(" ".join(text.split()))  # one line, whatever went into it


def _field(path: tuple[Any, ...] | list[Any]) -> str:
    """`("available_node_types", "gpu", "resources", "GPU")` -> `available_node_types.gpu.resources.GPU`;
    list positions as `setup_commands[2]`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- reading --------------------------------------------------------------------------------------

class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load semantics, except that a key given twice in one mapping is an error: Ray (and plain
    safe_load) would silently keep only the last one, e.g. the second of two `setup_commands`."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(problem=f"key {key!r} appears twice in one mapping",
                                         problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, label: str) -> tuple[dict[str, Any], str]:
    if not path.exists():
        raise _error(label, "file not found", "pass the path of a Ray cluster config such as cluster/cluster.yaml")
    if path.is_dir():
        raise _error(label, "is a directory", "pass the cluster config file itself, e.g. cluster/cluster.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(label, f"cannot be read ({type(exc).__name__}: {exc})", "check the file and its permissions")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = exc.problem or exc.context or "unparsable"
        if isinstance(exc, _DuplicateKeyError):
            raise _error(label, f"{where}: {problem} (YAML would keep only the last)",
                         "merge the two entries into one")
        raise _error(label, f"{where}: invalid YAML ({problem})", "check indentation, colons and quoting there")
    except yaml.YAMLError as exc:
        raise _error(label, f"invalid YAML ({exc})", "check indentation, colons and quoting")
    if data is None:
        raise _error(label, "is empty", "start from cluster/cluster.yaml or cluster/onprem.yaml")
    if not isinstance(data, dict):
        raise _error(label, f"top level is a {type(data).__name__}, not a mapping of cluster fields",
                     "write `field: value` lines such as `cluster_name: spt-ray`")
    return data, text


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Ray's helpers log and print (cli_logger) while they fill defaults; the CLI answers in one line."""
    loggers = [logging.getLogger(name) for name in ("ray.autoscaler", "ray")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _schema_message(label: str, exc: Any) -> ClusterConfigError:
    """Condense a jsonschema ValidationError (often a page long) to one line with the field path."""
    path = tuple(exc.absolute_path)
    instance, validator, schema = exc.instance, exc.validator, exc.schema or {}
    if validator == "additionalProperties" and isinstance(instance, dict):
        allowed = list(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        unknown = [k for k in instance if k not in allowed and not any(re.search(p, str(k)) for p in patterns)]
        name = unknown[0] if unknown else "?"
        close = difflib.get_close_matches(str(name), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return _error(label, f"{_field(path + (name,))} is not a field Ray knows{hint}",
                      f"remove it or correct its spelling; fields are listed at {RAY_CONFIG_DOCS}")
    if validator == "required" and isinstance(instance, dict):
        missing = [k for k in exc.validator_value if k not in instance]
        name = missing[0] if missing else "?"
        return _error(label, f"{_field(path + (name,))} is missing (Ray requires it)", f"add it; see {RAY_CONFIG_DOCS}")
    if validator == "type":
        expected = exc.validator_value if isinstance(exc.validator_value, str) else " or ".join(exc.validator_value)
        spelled = {"array": "a list", "object": "a mapping", "integer": "an integer", "string": "a string",
                   "boolean": "true or false", "number": "a number"}.get(expected, expected)
        fix = (integer_fix(str(path[-1])) if len(path) > 1 and path[-2] == "resources" and expected == "integer"
               else f"write it as {spelled}")  # a fractional GPU per node: say where fractions belong
        return _error(label, f"{_field(path)} is {_short(instance)}, Ray expects {spelled}", fix)
    if validator == "minimum":
        return _error(label, f"{_field(path)} is {_short(instance)}, Ray expects >= {exc.validator_value}",
                      "use a larger value")
    if validator == "enum":
        return _error(label, f"{_field(path)} is {_short(instance)}",
                      f"use one of {', '.join(map(str, exc.validator_value))}")
    first = str(exc.message).strip().splitlines()[0] if str(exc.message).strip() else validator
    return _error(label, f"{_field(path)}: {first[:200]}", f"see {RAY_CONFIG_DOCS}")


def _schema_precheck(raw: dict[str, Any], label: str) -> None:
    """Ray's schema on the file as written, so that messages point at the user's own fields and
    prepare_config never meets a wrong shape (a string where it concatenates lists, ...). Root
    `required` is left to the final check: the provider's defaults fill cluster_name."""
    import json

    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [e for e in validator.iter_errors(raw) if not (e.validator == "required" and not e.absolute_path)]
    if errors:
        raise _schema_message(label, jsonschema.exceptions.best_match(errors))


# ---- Ray's own checks, its errors in one line ------------------------------------------------------

def _providers() -> list[str]:
    from ray.autoscaler._private.providers import _NODE_PROVIDERS

    return sorted(p for p in _NODE_PROVIDERS if not p.startswith(("fake_", "readonly")))


def _explain(raw: dict[str, Any], exc: BaseException, label: str) -> ClusterConfigError:
    """What Ray's prepare_config / validate_config raised, as one line naming the field: its KeyError for a
    missing provider or NotImplementedError for an unknown one name no field and no fix."""
    message = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    provider = raw.get("provider") if isinstance(raw.get("provider"), dict) else {}
    node_types = ", ".join(map(str, raw.get("available_node_types") or {}))
    if isinstance(exc, KeyError) and exc.args == ("provider",):
        return _error(label, "provider is missing",
                      "add a provider section, e.g. `provider: {type: aws, region: us-west-2}` (see "
                      "cluster/cluster.yaml) or `provider: {type: local, head_ip: ..., worker_ips: [...]}` "
                      "(see cluster/onprem.yaml)")
    if isinstance(exc, NotImplementedError) and "node provider" in message:
        kind = str(provider.get("type"))
        close = difflib.get_close_matches(kind, _providers(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return _error(label, f"provider.type {kind!r} is not a Ray node provider{hint}",
                      f"use one of {', '.join(_providers())}")
    if "head_node_type" in message:
        what = ("head_node_type is missing" if "head_node_type" not in raw else
                f"head_node_type {_short(raw['head_node_type'])} is not one of available_node_types ({node_types})")
        return _error(label, what, f"set it to the node type of the head, one of: {node_types}")
    field = re.search(r"The field (\w+) is not supported for on-premise", message)
    if field:
        return _error(label, f"{field.group(1)} is not supported with provider.type local (Ray derives the single "
                             "node type from head_ip and worker_ips)", f"remove {field.group(1)}")
    if "worker_ips" in message:
        missing = next((k for k in ("head_ip", "worker_ips") if k not in provider), "worker_ips")
        return _error(label, f"provider.{missing} is missing", "list the machines: `head_ip: <address>` and "
                      "`worker_ips: [<address>, ...]` (or give a coordinator_address)")
    if "max_workers` is smaller" in message:
        return _error(label, f"max_workers: {message}", "raise max_workers or lower a min_workers")
    if "container & image" in message:
        return _error(label, f"docker: {message}", "give docker both `image` and `container_name`, or remove "
                      "the docker section")
    return _error(label, f"Ray rejected it ({type(exc).__name__}: {message[:200]})", f"see {RAY_CONFIG_DOCS}")


def _ray_prepare_and_validate(raw: dict[str, Any], label: str) -> dict[str, Any]:
    try:
        import jsonschema
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        raise _error(label, f"cannot be checked: Ray's cluster launcher is not importable ({exc})",
                     "pip install 'ray[default]' in this environment")
    import click

    _schema_precheck(raw, label)
    with _quiet():
        try:
            prepared = prepare_config(copy.deepcopy(raw))
            validate_config(prepared)
        except jsonschema.ValidationError as exc:
            raise _schema_message(label, exc) from None
        except click.ClickException as exc:  # cli_logger.abort()
            raise _explain(raw, RuntimeError(exc.format_message()), label) from None
        except Exception as exc:  # noqa: BLE001 - Ray's helpers raise ValueError, KeyError, NotImplementedError...
            raise _explain(raw, exc, label) from None
    return prepared


# ---- public ---------------------------------------------------------------------------------------

def validate_cluster_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a Ray cluster-launcher YAML offline and return the config as Ray prepares it.

    Order matters for the messages: reading and secrets first (a secret is reported even in an
    otherwise broken file, and never echoed), then Ray's schema and ``prepare_config`` + ``validate_config``,
    then what needs the prepared config (Ray's default start commands, the node types it fills in).
    Raises ClusterConfigError (a ValueError) with a one-line message for the first problem found.
    """
    label = os.fspath(path)
    raw, text = _read_yaml(Path(label).expanduser(), label)
    check_secrets(raw, text, label, _error, _field)
    check_start_flags(raw, label, _error)
    prepared = _ray_prepare_and_validate(raw, label)
    check_dashboard(raw, prepared, label, _error)
    check_project_installed(raw, prepared, label, _error)
    return prepared


def summarize_cluster_config(config: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> str:
    """One line about a config returned by validate_cluster_config, for `spt-ray cluster validate`:
    `aws, head + 1 worker type, max workers 8`, or with `path` the CLI's whole answer,
    `OK: cluster/cluster.yaml (aws, head + 1 worker type, max workers 8)`. A worker type is a node type
    that can be launched as a worker: every non-head type, and on a local cluster the one type there is."""
    provider = (config.get("provider") or {}).get("type", "unknown")
    node_types: Mapping[str, Any] = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    workers = [name for name, spec in node_types.items() if name != head or (spec or {}).get("max_workers", 0) > 0]
    count = len(workers)
    summary = (f"{provider}, head + {count} worker type{'' if count == 1 else 's'}, "
               f"max workers {config.get('max_workers', 0)}")
    return summary if path is None else f"OK: {os.fspath(path)} ({summary})"
