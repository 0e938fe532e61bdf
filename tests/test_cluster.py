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


# ---- KubeRay manifests (cluster/kuberay) -----------------------------------------------------------
KUBERAY = CLUSTER_DIR / "kuberay"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _values(node: Any) -> list[Any]:
    """Every scalar in a parsed manifest (comments excluded)."""
    if isinstance(node, dict):
        return [v for item in node.values() for v in _values(item)]
    if isinstance(node, list):
        return [v for item in node for v in _values(item)]
    return [node]


def _pods(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = cluster["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def test_kuberay_manifests_are_complete_and_expose_nothing() -> None:
    import ray

    from spt_ray.cluster import ClusterConfigError, _error, _field
    from spt_ray.cluster_secrets import check_secrets

    docs = {name: _docs(name) for name in ("raycluster.yaml", "rayjob.yaml", "storage.yaml")}
    for name, items in docs.items():  # no credentials anywhere (keys, tokens, KEY=value in commands, comments)
        for doc in items:
            check_secrets(doc, (KUBERAY / name).read_text(), name, _error, _field)
    everything = [d for items in docs.values() for d in items]
    assert all({"apiVersion", "kind", "metadata"} <= set(d) and d["metadata"].get("name") for d in everything)
    cluster = next(d for d in docs["raycluster.yaml"] if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == ray.__version__
    assert f"rayproject/ray:{ray.__version__}-" in (KUBERAY / "Dockerfile").read_text()  # same Ray everywhere

    # dashboard not exposed: a ClusterIP head service, no Ingress / LoadBalancer / NodePort, no public
    # dashboard-host, and a NetworkPolicy that admits only this namespace's pods to the head
    head = cluster["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert not [d for d in everything if d["kind"] in ("Ingress", "Service")]
    values = [str(v) for d in everything for v in _values(d)]
    assert not [v for v in values if v in ("LoadBalancer", "NodePort") or "0.0.0.0" in v]
    policy = next(d for d in docs["raycluster.yaml"] if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]  # no namespaceSelector / ipBlock

    # every pod runs the image built with the package and mounts the data (read-only) and the storage
    claims = {d["metadata"]["name"]: d for d in docs["storage.yaml"] if d["kind"] == "PersistentVolumeClaim"}
    for group, pod in _pods(cluster).items():
        container = pod["containers"][0]
        assert "spt-ray" in container["image"], group
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/mnt/data"].get("readOnly") and "/mnt/runs" in mounts, group
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in mounts.values():
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            assert claim is None or claim["claimName"] in claims, group
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims.values())
    gpu_groups = [g for g in cluster["spec"]["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups and all(isinstance(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                         ["nvidia.com/gpu"], int) for g in gpu_groups)  # whole GPUs per pod
    assert head["rayStartParams"].get("num-cpus") == "0"  # no trials on the head
    with pytest.raises(ClusterConfigError):  # the scanner does see a key (the check above is not vacuous)
        check_secrets({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": FAKE_SECRET}]}, "", "x", _error, _field)


def test_kuberay_job_runs_the_vtab_sweep_with_flags_the_script_accepts() -> None:
    import argparse
    import shlex

    from spt_ray.launch import add_tune_args

    cluster = next(d for d in _docs("raycluster.yaml") if d["kind"] == "RayCluster")
    job = next(d for d in _docs("rayjob.yaml") if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == "/home/ray/spt-ray/sweeps/vtab.py"
    assert (CLUSTER_DIR.parent / "sweeps" / "vtab.py").is_file()
    args = add_tune_args(argparse.ArgumentParser(exit_on_error=False), suite="vtab").parse_args(argv[2:])
    assert args.data_root.startswith("/mnt/data/") and args.weights.startswith("/mnt/data/")
    assert args.storage.startswith("/mnt/runs")  # the shared ReadWriteMany volume every pod mounts
    assert "/home/ray/spt-ray" in (KUBERAY / "Dockerfile").read_text()
