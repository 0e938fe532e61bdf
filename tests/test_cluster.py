"""The shipped cluster configs pass Ray's own validator offline, and each typical defect in a copy of
them is reported as one ClusterConfigError line that names the field (and never echoes a secret)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from spt_ray.cluster import ClusterConfigError, summarize_cluster_config, validate_cluster_config

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster"
CLOUD = CLUSTER_DIR / "cluster.yaml"
ONPREM = CLUSTER_DIR / "onprem.yaml"
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _write(tmp_path: Path, config: dict[str, Any], name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _error_for(path: Path) -> str:
    with pytest.raises(ClusterConfigError) as info:
        validate_cluster_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert "; fix: " in message, message
    return message


@pytest.mark.parametrize("path, summary", [
    (CLOUD, "aws, head + 1 worker type, max workers 8"),
    (ONPREM, "local, head + 1 worker type, max workers 2"),
])
def test_shipped_configs_validate(path: Path, summary: str) -> None:
    config = validate_cluster_config(path)
    assert summarize_cluster_config(config) == summary
    assert summarize_cluster_config(config, "c.yaml") == f"OK: c.yaml ({summary})"
    assert "cluster_synced_files" in config  # prepared by Ray, as `ray up` would


def test_shipped_configs_install_the_synced_repo_in_a_pinned_image() -> None:
    for path in (CLOUD, ONPREM):
        config = _load(path)
        assert config["file_mounts"] == {"~/spt-ray": "."}
        assert "pip install -q -e ~/spt-ray" in config["setup_commands"]
        assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-py311-gpu")


def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        target = config
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


def _append(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        target = config
        for key in keys:
            target = target[key]
        target.append(value)
    return edit


def _delete(*keys: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        target = config
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


HEAD_START = "ulimit -n 65536; ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml"

CLOUD_DEFECTS: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "fractional GPU": (_set("available_node_types", "gpu_worker", "resources", "GPU", value=0.5),
                       ("available_node_types.gpu_worker.resources.GPU is 0.5", "--gpus-per-trial")),
    "fractional CPU flag": (_set("worker_start_ray_commands", 1, value="ray start --address=$RAY_HEAD_IP:6379 "
                                                                      "--num-cpus=1.5"),
                            ("worker_start_ray_commands[1]", "--num-cpus=1.5")),
    "missing provider": (_delete("provider"), ("provider is missing",)),
    "unknown provider": (_set("provider", "type", value="aws2"), ("provider.type 'aws2'", "did you mean 'aws'")),
    "unknown top-level field": (_set("max_worker", value=4), ("max_worker is not a field Ray knows",
                                                              "did you mean 'max_workers'")),
    "unknown node-type field": (_set("available_node_types", "gpu_worker", "min_worker", value=1),
                                ("available_node_types.gpu_worker.min_worker is not a field",)),
    "wrong type": (_set("available_node_types", "gpu_worker", "min_workers", value="two"),
                   ("available_node_types.gpu_worker.min_workers is 'two'", "integer")),
    "missing head_node_type": (_delete("head_node_type"), ("head_node_type is missing", "one of: head, gpu_worker")),
    "commands not a list": (_set("setup_commands", value="pip install -e ~/spt-ray"),
                            ("setup_commands is 'pip install -e ~/spt-ray', Ray expects a list",)),
    "missing node_config": (_delete("available_node_types", "gpu_worker", "node_config"),
                            ("available_node_types.gpu_worker.node_config is missing",)),
    "min above max": (_set("available_node_types", "gpu_worker", "min_workers", value=9),
                      ("max_workers",)),
    "public dashboard": (_set("head_start_ray_commands", 1, value=HEAD_START + " --dashboard-host=0.0.0.0"),
                         ("head_start_ray_commands[1] binds the dashboard to 0.0.0.0", "ray dashboard")),
    "Ray's default start command": (_delete("head_start_ray_commands"),
                                    ("head_start_ray_commands is not set", "0.0.0.0")),
    "dashboard open in the security group": (
        _set("provider", "security_group", value={"GroupName": "spt", "IpPermissions": [
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}),
        ("provider.security_group.IpPermissions[0] opens port 8265 to 0.0.0.0/0",)),
    "secret key": (_set("provider", "aws_secret_access_key", value=FAKE_SECRET),
                   ("provider.aws_secret_access_key holds a secret",)),
    "secret in a command": (_append("setup_commands", value=f"export AWS_SECRET_ACCESS_KEY={FAKE_SECRET}"),
                            ("setup_commands[1] contains what looks like a secret",)),
    "token in a command": (_append("head_setup_commands", value="huggingface-cli login --token hf_"
                                                                "abcdefghijklmnopqrstuvwxyzABCDEF"),
                           ("head_setup_commands[1] contains what looks like a secret",)),
    "no setup installs the project": (_set("setup_commands", value=[]),
                                      ("setup_commands does not install the project", "pip install -e ~/spt-ray")),
    "installed only on the head": (lambda c: (c.__setitem__("head_setup_commands", c["setup_commands"]),
                                              c.__setitem__("setup_commands", [])),
                                   ("worker nodes (gpu_worker) do not install the project",)),
    "repo not synced": (_set("file_mounts", value={}),
                        ("setup_commands[0] installs ~/spt-ray, which file_mounts does not sync",)),
    "node type replaces setup": (_set("available_node_types", "gpu_worker", "worker_setup_commands",
                                      value=["nvidia-smi"]),
                                 ("available_node_types.gpu_worker.worker_setup_commands replaces setup_commands",)),
    "installed outside the container": (
        lambda c: (c["initialization_commands"].append("pip install -e ~/spt-ray"), c.__setitem__("setup_commands", [])),
        ("initialization_commands installs the project on the host",)),
}


@pytest.mark.parametrize("defect", list(CLOUD_DEFECTS))
def test_cloud_defects_are_one_line_errors_naming_the_field(tmp_path: Path, defect: str) -> None:
    edit, expected = CLOUD_DEFECTS[defect]
    config = copy.deepcopy(_load(CLOUD))
    edit(config)
    message = _error_for(_write(tmp_path, config))
    for part in expected:
        assert part in message, message
    assert FAKE_SECRET not in message and "hf_abcdef" not in message


def test_project_in_the_image_needs_no_setup(tmp_path: Path) -> None:
    config = _load(CLOUD)
    config["setup_commands"] = []
    config["file_mounts"] = {}
    config["docker"]["image"] = "123456789012.dkr.ecr.us-west-2.amazonaws.com/spt-ray:0.1.0-gpu"
    validate_cluster_config(_write(tmp_path, config))


def test_package_spec_and_cd_install_count(tmp_path: Path) -> None:
    config = _load(CLOUD)
    config["setup_commands"] = ["cd ~/spt-ray && python -m pip install --no-deps -e ."]
    validate_cluster_config(_write(tmp_path, config))
    config["setup_commands"] = ["pip install -q 'spt-ray[dev]==0.1.0'"]
    config["file_mounts"] = {}
    validate_cluster_config(_write(tmp_path, config))


def test_environment_references_and_key_paths_are_not_secrets(tmp_path: Path) -> None:
    config = _load(ONPREM)
    config["setup_commands"].append("export WANDB_API_KEY=$WANDB_API_KEY")
    config["provider"]["api_token"] = "${API_TOKEN}"
    validate_cluster_config(_write(tmp_path, config))


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster_name: spt-ray\nprovider:\n  type: aws\n   region: us-west-2\n")
    message = _error_for(path)
    assert "line 4" in message and "invalid YAML" in message


def test_duplicate_key_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    text = CLOUD.read_text()
    path.write_text(text + "\nsetup_commands: []\n")
    message = _error_for(path)
    assert f"line {text.count(chr(10)) + 2}" in message and "'setup_commands' appears twice" in message


def test_secret_in_a_comment(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(CLOUD.read_text() + "# old key: AKIAABCDEFGHIJKLMNOP\n")
    message = _error_for(path)
    assert "AWS access key id" in message and "AKIAABCD" not in message


@pytest.mark.parametrize("content, expected", [
    ("", "is empty"),
    ("- a\n- b\n", "top level is a list"),
])
def test_not_a_config(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(content)
    assert expected in _error_for(path)


def test_missing_file(tmp_path: Path) -> None:
    assert "file not found" in _error_for(tmp_path / "nope.yaml")


ONPREM_DEFECTS: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "node types on a local cluster": (_set("available_node_types", value={"x": {"resources": {}, "node_config": {}}}),
                                      ("available_node_types is not supported with provider.type local",)),
    "no worker_ips": (_delete("provider", "worker_ips"), ("provider.worker_ips is missing",)),
    "password": (_set("auth", "ssh_password", value="hunter2hunter2"), ("auth.ssh_password holds a secret",)),
    "no install": (_set("setup_commands", value=["echo hi"]), ("setup_commands does not install the project",)),
}


@pytest.mark.parametrize("defect", list(ONPREM_DEFECTS))
def test_onprem_defects(tmp_path: Path, defect: str) -> None:
    edit, expected = ONPREM_DEFECTS[defect]
    config = copy.deepcopy(_load(ONPREM))
    edit(config)
    message = _error_for(_write(tmp_path, config, "onprem.yaml"))
    for part in expected:
        assert part in message, message
    assert "hunter2" not in message
