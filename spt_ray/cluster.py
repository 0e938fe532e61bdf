"""Offline validation of Ray cluster-launcher configs (``spt-ray cluster validate FILE``).

`ray up` finds most mistakes only after it has started paying for machines: a typo in a field, a
fractional GPU count, a worker that never installs the project and fails every trial on import. This
module runs Ray's own preparation and schema check (``prepare_config`` + ``validate_config`` from
``ray.autoscaler._private.util``, which need no cloud access) and adds what Ray does not check but a
sweep depends on:

- resource counts per node are whole numbers (fractional GPUs belong to trials, not to node types),
- the dashboard is not exposed (no ``--dashboard-host=0.0.0.0``, no security-group rule opening ports
  other than SSH to the internet); it is reached with ``ray dashboard FILE`` instead,
- every node installs the project: a setup command pip-installs a path that file_mounts syncs (or the
  ``spt-ray`` package), or the docker image is one built with the project (``spt-ray`` in its name),
- no credentials in the file (keys such as ``aws_secret_access_key``/``password``/``token`` with
  literal values, AWS key ids, private keys, API tokens in commands or comments),
- no key given twice (YAML keeps the last one silently).

Every problem raises :class:`ClusterConfigError` with one line: the file, the field, the problem and the
fix. Secret values are never repeated in a message.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import logging
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ClusterConfigError", "validate_cluster_config", "summarize_cluster_config"]

RAY_CONFIG_DOCS = "https://docs.ray.io/en/latest/cluster/vms/references/ray-cluster-configuration.html"
# Providers whose defaults ship with Ray (plus "external", which names its own module).
KNOWN_PROVIDERS = ("aws", "gcp", "azure", "aliyun", "vsphere", "local", "external")
LOCAL_ONLY_FIELDS = ("available_node_types", "head_node_type", "head_node", "worker_nodes")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
PROJECT_NAME = re.compile(r"spt[-_]ray", re.IGNORECASE)


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


# ---- secrets --------------------------------------------------------------------------------------

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


def _check_secrets(raw: dict[str, Any], text: str, label: str) -> None:
    for path, key, value in _walk(raw):
        if (isinstance(key, str) and key not in NOT_SECRET_KEYS and SECRET_KEY.search(key)
                and isinstance(value, (str, int, float)) and not isinstance(value, bool)
                and str(value).strip() and not _is_reference(str(value).strip())):
            raise _error(label, f"{_field(path)} holds a secret", SECRET_FIX)
        if isinstance(value, str):
            kind = _secret_in_string(value)
            if kind:
                raise _error(label, f"{_field(path)} contains what looks like a secret ({kind})", SECRET_FIX)
    # Comments never reach the parsed config but are still in the file that gets shared and committed.
    for number, line in enumerate(text.splitlines(), start=1):
        for kind, pattern in SECRET_PATTERNS:
            if pattern.search(line):
                raise _error(label, f"line {number} contains what looks like a secret ({kind})", SECRET_FIX)


# ---- before Ray: provider and resource counts -----------------------------------------------------

def _check_provider(raw: dict[str, Any], label: str) -> str:
    provider = raw.get("provider")
    if provider is None:
        raise _error(label, "provider is missing",
                     "add a provider section, e.g. `provider: {type: aws, region: us-west-2}` (see "
                     "cluster/cluster.yaml) or `provider: {type: local, head_ip: ..., worker_ips: [...]}` "
                     "(see cluster/onprem.yaml)")
    if not isinstance(provider, dict):
        raise _error(label, f"provider is {_short(provider)}, not a mapping",
                     "write it as `provider:` followed by indented `type: aws`, `region: ...`")
    kind = provider.get("type")
    if not kind:
        raise _error(label, "provider.type is missing", f"set it to one of {', '.join(KNOWN_PROVIDERS)}")
    if kind not in KNOWN_PROVIDERS and not str(kind).startswith("fake_multinode"):
        close = difflib.get_close_matches(str(kind), KNOWN_PROVIDERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _error(label, f"provider.type {kind!r} is not a Ray node provider{hint}",
                     f"use one of {', '.join(KNOWN_PROVIDERS)}")
    node_types = raw.get("available_node_types")
    if kind != "local" and isinstance(node_types, dict) and node_types:
        head = raw.get("head_node_type")
        names = ", ".join(map(str, node_types))
        if head is None:
            raise _error(label, "head_node_type is missing", f"set it to the node type of the head, one of: {names}")
        if head not in node_types:
            raise _error(label, f"head_node_type {_short(head)} is not one of available_node_types ({names})",
                         "name one of those node types, or add it")
    if kind == "local":
        for name in LOCAL_ONLY_FIELDS:
            if raw.get(name):
                raise _error(label, f"{name} is not supported with provider.type local (Ray derives the single "
                                    "node type from head_ip and worker_ips)", f"remove {name}")
        if "coordinator_address" not in provider:
            for name in ("head_ip", "worker_ips"):
                if name not in provider:
                    raise _error(label, f"provider.{name} is missing",
                                 "list the machines: `head_ip: <address>` and `worker_ips: [<address>, ...]` "
                                 "(or give a coordinator_address)")
    return str(kind)


def _check_resource_counts(raw: dict[str, Any], label: str) -> None:
    """Ray's schema also demands integers, but its message does not say where fractions belong."""
    node_types = raw.get("available_node_types")
    if isinstance(node_types, dict):
        for name, spec in node_types.items():
            resources = spec.get("resources") if isinstance(spec, dict) else None
            if not isinstance(resources, dict):
                continue
            for resource, count in resources.items():
                field = _field(("available_node_types", name, "resources", resource))
                if isinstance(count, bool) or not isinstance(count, int):
                    raise _error(label, f"{field} is {_short(count)}", _integer_fix(str(resource)))
                if count < 0:
                    raise _error(label, f"{field} is {count}", "use a count >= 0")
    for commands_field in ("head_start_ray_commands", "worker_start_ray_commands"):
        for index, command in enumerate(_commands(raw.get(commands_field))):
            for match in re.finditer(r"--num-(gpus|cpus)(?:=|\s+)['\"]?([^\s'\";]+)", command):
                if not re.fullmatch(r"\d+", match.group(2)):
                    raise _error(label, f"{commands_field}[{index}] passes --num-{match.group(1)}={match.group(2)}",
                                 _integer_fix(match.group(1)[:-1].upper()))


def _integer_fix(resource: str) -> str:
    if resource == "GPU":
        return "use an integer count per node and fractional GPUs per trial with --gpus-per-trial"
    return "use a whole number per node (its real count); only trials take fractions of a resource"


def _commands(value: Any) -> list[str]:
    return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []


# ---- Ray's own preparation and schema ------------------------------------------------------------

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
        return _error(label, f"{_field(path)} is {_short(instance)}, Ray expects {spelled}", f"write it as {spelled}")
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


# Ray's own ValueErrors from validate_config, mapped to the field they are about.
RAY_MESSAGES = (
    ("head_node_type", "head_node_type", "set head_node_type to one of the names under available_node_types"),
    ("container & image", "docker", "give docker both `image` and `container_name`, or remove the docker section"),
)


def _ray_prepare_and_validate(raw: dict[str, Any], label: str) -> dict[str, Any]:
    try:
        import jsonschema
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        raise _error(label, f"cannot be checked: Ray's cluster launcher is not importable ({exc})",
                     "pip install 'ray[default]' in this environment")
    import click

    _schema_precheck(raw, label)
    node_types = raw.get("available_node_types") or {}
    floor = sum(spec.get("min_workers", 0) for spec in node_types.values())
    if floor > raw.get("max_workers", floor):
        raise _error(label, f"max_workers is {raw['max_workers']} but the node types' min_workers add up to {floor}",
                     "raise max_workers or lower a min_workers")
    with _quiet():
        try:
            prepared = prepare_config(copy.deepcopy(raw))
            validate_config(prepared)
        except jsonschema.ValidationError as exc:
            raise _schema_message(label, exc) from None
        except click.ClickException as exc:  # cli_logger.abort()
            raise _error(label, f"Ray rejected it: {exc.format_message()}", f"see {RAY_CONFIG_DOCS}") from None
        except Exception as exc:  # noqa: BLE001 - Ray's helpers raise ValueError, AssertionError, KeyError, ...
            message = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
            for needle, field, fix in RAY_MESSAGES:
                if needle in message:
                    raise _error(label, f"{field}: {message}", fix) from None
            raise _error(label, f"Ray rejected it ({type(exc).__name__}: {message[:200]})",
                         f"see {RAY_CONFIG_DOCS}") from None
    return prepared


# ---- after Ray: exposure and installation --------------------------------------------------------

DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)['\"]?([^\s'\";]+)")


def _check_dashboard(raw: dict[str, Any], prepared: dict[str, Any], label: str, provider: str) -> None:
    for index, command in enumerate(_commands(prepared.get("head_start_ray_commands"))):
        for match in DASHBOARD_HOST.finditer(command):
            host = match.group(1)
            if host in LOOPBACK_HOSTS:
                continue
            what = (f"head_start_ray_commands[{index}] binds the dashboard to {host}"
                    if "head_start_ray_commands" in raw else
                    f"head_start_ray_commands is not set and Ray's {provider} default binds the dashboard to {host}")
            raise _error(label, what,
                         f"set head_start_ray_commands without --dashboard-host (or with "
                         f"--dashboard-host=127.0.0.1) and open it with `ray dashboard {label}`")
    rules = (prepared.get("provider") or {}).get("security_group", {}).get("IpPermissions", [])
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, dict):
            continue
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", []) if isinstance(r, dict)]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", []) if isinstance(r, dict)]
        public = [c for c in cidrs if c in ("0.0.0.0/0", "::/0")]
        protocol = str(rule.get("IpProtocol", "-1"))
        low, high = rule.get("FromPort"), rule.get("ToPort")
        if not public or (protocol == "tcp" and low == 22 and high == 22):
            continue
        ports = "all ports" if protocol == "-1" or low in (None, -1) else (
            f"port {low}" if low == high else f"ports {low}-{high}")
        raise _error(label, f"provider.security_group.IpPermissions[{index}] opens {ports} to {public[0]}",
                     f"remove the rule (Ray already allows SSH) or limit it to your own address range; "
                     f"open the dashboard with `ray dashboard {label}`")


PIP_INSTALL = re.compile(r"(?:^|[\s;&|(])(?:\S*/)?(?:pip3?|uv\s+pip|python3?(?:\.\d+)?\s+-m\s+pip)\s+install\b"
                         r"([^;&|)]*)")
PIP_OPTIONS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                          "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--src",
                          "--upgrade-strategy", "-C", "--config-settings", "--python-version", "--platform",
                          "--implementation", "--abi", "--only-binary", "--no-binary", "--progress-bar", "--log",
                          "--cache-dir", "--timeout", "--retries", "--trusted-host", "--proxy", "--exists-action",
                          "--report", "--python"}


def _pip_targets(command: str) -> list[str]:
    """What each `pip install` in a shell command installs (paths, package specs, URLs), with a
    `cd DIR && pip install -e .` resolved to DIR."""
    targets: list[str] = []
    for match in PIP_INSTALL.finditer(command):
        try:
            tokens = shlex.split(match.group(1))
        except ValueError:
            tokens = match.group(1).split()
        skip = False
        for token in tokens:
            if skip:
                skip = False
                continue
            if token in ("-e", "--editable"):
                continue
            if token.startswith(("-e=", "--editable=")):
                token = token.split("=", 1)[1]
            elif token in PIP_OPTIONS_WITH_VALUE:
                skip = True
                continue
            elif token.startswith("-"):
                continue
            if token in (".", "./"):
                cds = re.findall(r"\bcd\s+([^\s;&|]+)", command[: match.start(1)])
                token = cds[-1] if cds else token
            targets.append(re.sub(r"\[[^\]]*\]$", "", token))
    return targets


def _norm_remote(path: str) -> str:
    """Spell home-relative remote paths one way: `$HOME/x`, `/home/ray/x`, `~/x/` -> `~/x`."""
    path = path.strip().strip("'\"")
    for prefix in ("${HOME}", "$HOME"):
        if path == prefix or path.startswith(prefix + "/"):
            path = "~" + path[len(prefix):]
    path = re.sub(r"^/home/[^/]+(?=/|$)|^/root(?=/|$)", "~", path)
    return path.rstrip("/") or "/"


def _is_path(target: str) -> bool:
    return target.startswith(("~", "/", ".", "$")) and "://" not in target


def _installs_project(target: str, mounts: set[str]) -> bool:
    if _is_path(target):
        norm = _norm_remote(target)
        return norm in mounts or f"{norm}/pyproject.toml" in mounts
    return bool(PROJECT_NAME.search(target))  # spt-ray==0.1.0, spt_ray-0.1.0-py3-none-any.whl, git+https://.../spt-ray


def _check_project_installed(raw: dict[str, Any], prepared: dict[str, Any], label: str) -> None:
    """Every node that can run a trial must be able to `import spt_ray`: `ray submit` copies only the
    sweep script, so the package reaches the nodes through file_mounts + a pip install, or an image."""
    docker = prepared.get("docker") or {}
    node_types: dict[str, Any] = prepared.get("available_node_types") or {}
    head_type = prepared.get("head_node_type")
    images = {docker.get("head_image") or docker.get("image"), docker.get("worker_image") or docker.get("image")}
    images |= {(spec.get("docker") or {}).get("worker_image") for spec in node_types.values()}
    images.discard(None)
    images.discard("")
    if images and all(PROJECT_NAME.search(str(image)) for image in images):
        return  # an image built with the project (documented in cluster/cluster.yaml)

    mounts = {_norm_remote(str(remote)) for remote in (raw.get("file_mounts") or {})}
    # With docker, initialization commands run on the host, outside the container the trials run in.
    in_container = bool(images)

    def installs(fields: list[tuple[str, Any]]) -> bool:
        found = False
        for name, value in fields:
            for index, command in enumerate(_commands(value)):
                for target in _pip_targets(command):
                    if _installs_project(target, mounts):
                        found = True
                    elif _is_path(target) and PROJECT_NAME.search(target.rstrip("/").rsplit("/", 1)[-1]):
                        raise _error(label, f"{name}[{index}] installs {target}, which file_mounts does not sync",
                                     f"add the file_mounts entry `{target}: .` (run `ray up` from the "
                                     "repository root)")
        return found

    init = [("initialization_commands", raw.get("initialization_commands"))]
    if in_container and installs(init):
        raise _error(label, "initialization_commands installs the project on the host, outside the docker "
                            "container where Ray and the trials run", "move that pip install to setup_commands")
    shared = [] if in_container else init
    head_ok = installs(shared + [("setup_commands", raw.get("setup_commands")),
                                 ("head_setup_commands", raw.get("head_setup_commands"))])
    missing: list[str] = []
    own_missing: list[str] = []
    for name, spec in node_types.items():
        if name == head_type and not spec.get("max_workers"):
            continue  # the head's type launches no workers
        own = spec.get("worker_setup_commands")
        if own is not None:  # replaces setup_commands + worker_setup_commands for this type
            field = f"available_node_types.{name}.worker_setup_commands"
            if not installs(shared + [(field, own)]):
                own_missing.append(field)
        elif not installs(shared + [("setup_commands", raw.get("setup_commands")),
                                    ("worker_setup_commands", raw.get("worker_setup_commands"))]):
            missing.append(name)
    example = "sync the repo with file_mounts `~/spt-ray: .` and add `pip install -e ~/spt-ray` to setup_commands"
    if not head_ok and (missing or own_missing):
        raise _error(label, "setup_commands does not install the project, so `import spt_ray` fails on every node",
                     f"{example} (or use a docker image with \"spt-ray\" in its name that contains it)")
    if not head_ok:
        raise _error(label, "the head node does not install the project (setup_commands + head_setup_commands)",
                     f"{example}, which every node runs")
    if own_missing:
        raise _error(label, f"{own_missing[0]} replaces setup_commands for that node type and does not install "
                            "the project", "add `pip install -e ~/spt-ray` to it")
    if missing:
        raise _error(label, f"worker nodes ({', '.join(missing)}) do not install the project (setup_commands + "
                            "worker_setup_commands)", f"{example}, which every node runs")


# ---- public ---------------------------------------------------------------------------------------

def validate_cluster_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a Ray cluster-launcher YAML offline and return the config as Ray prepares it.

    Order matters for the messages: reading and secrets first (a secret is reported even in an
    otherwise broken file, and never echoed), then the checks whose messages are better than Ray's
    (provider, resource counts), then Ray's schema and ``prepare_config`` + ``validate_config``, then
    what needs the prepared config (Ray's defaults for start commands, node types of a local cluster).
    Raises ClusterConfigError (a ValueError) with a one-line message for the first problem found.
    """
    label = os.fspath(path)
    raw, text = _read_yaml(Path(label).expanduser(), label)
    _check_secrets(raw, text, label)
    provider = _check_provider(raw, label)
    _check_resource_counts(raw, label)
    prepared = _ray_prepare_and_validate(raw, label)
    _check_dashboard(raw, prepared, label, provider)
    _check_project_installed(raw, prepared, label)
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
