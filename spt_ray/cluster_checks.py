"""What a sweep needs of a cluster-launcher config that Ray's validator does not check.

- the dashboard is not exposed: no `--dashboard-host` other than loopback in the head's start commands
  (Ray's own default for a provider binds 0.0.0.0), no security-group rule opening ports other than SSH
  to the internet; it is reached with `ray dashboard FILE` instead;
- every node installs the project: `ray submit` copies only the sweep script, so a setup command must
  pip-install a path that file_mounts syncs (or the `spt-ray` package), or the docker image must be one
  built with the project (`spt-ray` in its name);
- resource flags in start commands are whole numbers (Ray checks node-type resources, not these).

Each check raises `error(label, what, fix)` (spt_ray.cluster's one-line ClusterConfigError).
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Callable

Error = Callable[[str, str, str], Exception]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
PROJECT_NAME = re.compile(r"spt[-_]ray", re.IGNORECASE)


def commands(value: Any) -> list[str]:
    return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []


def integer_fix(resource: str) -> str:
    if resource == "GPU":
        return "use an integer count per node and fractional GPUs per trial with --gpus-per-trial"
    return "use a whole number per node (its real count); only trials take fractions of a resource"


def check_start_flags(raw: dict[str, Any], label: str, error: Error) -> None:
    """`ray start --num-gpus=0.5` in a start command: Ray's schema sees only a string."""
    for commands_field in ("head_start_ray_commands", "worker_start_ray_commands"):
        for index, command in enumerate(commands(raw.get(commands_field))):
            for match in re.finditer(r"--num-(gpus|cpus)(?:=|\s+)['\"]?([^\s'\";]+)", command):
                if not re.fullmatch(r"\d+", match.group(2)):
                    raise error(label, f"{commands_field}[{index}] passes --num-{match.group(1)}={match.group(2)}",
                                integer_fix(match.group(1)[:-1].upper()))


DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)['\"]?([^\s'\";]+)")


def check_dashboard(raw: dict[str, Any], prepared: dict[str, Any], label: str, error: Error) -> None:
    provider = (prepared.get("provider") or {}).get("type", "unknown")
    for index, command in enumerate(commands(prepared.get("head_start_ray_commands"))):
        for match in DASHBOARD_HOST.finditer(command):
            host = match.group(1)
            if host in LOOPBACK_HOSTS:
                continue
            what = (f"head_start_ray_commands[{index}] binds the dashboard to {host}"
                    if "head_start_ray_commands" in raw else
                    f"head_start_ray_commands is not set and Ray's {provider} default binds the dashboard to {host}")
            raise error(label, what,
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
        raise error(label, f"provider.security_group.IpPermissions[{index}] opens {ports} to {public[0]}",
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


def check_project_installed(raw: dict[str, Any], prepared: dict[str, Any], label: str, error: Error) -> None:
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
            for index, command in enumerate(commands(value)):
                for target in _pip_targets(command):
                    if _installs_project(target, mounts):
                        found = True
                    elif _is_path(target) and PROJECT_NAME.search(target.rstrip("/").rsplit("/", 1)[-1]):
                        raise error(label, f"{name}[{index}] installs {target}, which file_mounts does not sync",
                                    f"add the file_mounts entry `{target}: .` (run `ray up` from the "
                                    "repository root)")
        return found

    init = [("initialization_commands", raw.get("initialization_commands"))]
    if in_container and installs(init):
        raise error(label, "initialization_commands installs the project on the host, outside the docker "
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
        raise error(label, "setup_commands does not install the project, so `import spt_ray` fails on every node",
                    f"{example} (or use a docker image with \"spt-ray\" in its name that contains it)")
    if not head_ok:
        raise error(label, "the head node does not install the project (setup_commands + head_setup_commands)",
                    f"{example}, which every node runs")
    if own_missing:
        raise error(label, f"{own_missing[0]} replaces setup_commands for that node type and does not install "
                            "the project", "add `pip install -e ~/spt-ray` to it")
    if missing:
        raise error(label, f"worker nodes ({', '.join(missing)}) do not install the project (setup_commands + "
                            "worker_setup_commands)", f"{example}, which every node runs")
