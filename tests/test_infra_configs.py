"""Offline checks of the deployment configs under infra/.

Nothing here talks to a cloud, a cluster, a registry or a Docker engine. The
checks use the validators that ship with the installed packages (Ray's cluster
config schema and preparation code, Ray's and MLflow's own CLI parsers) plus
structural assertions about the settings the README relies on. Checks that
need a local tool (bash, kubectl, nginx, systemd-analyze, git) skip when the
tool is missing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
README = INFRA / "README.md"
DOCKERFILE = INFRA / "Dockerfile"
RAY_YAMLS = sorted((INFRA / "ray").glob("*.yaml"))
K8S = INFRA / "k8s"
MLFLOW = INFRA / "mlflow"
COMPOSE = MLFLOW / "compose.yaml"
NGINX_TEMPLATE = MLFLOW / "nginx" / "default.conf.template"
SYSTEMD_UNIT = MLFLOW / "systemd" / "mlflow.service"

# Names of settings whose values are credentials.
SECRET_NAME = re.compile(
    r"(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_KEY|ACCESS_KEY|API_KEY|CREDENTIAL)", re.IGNORECASE
)
PLACEHOLDER = re.compile(
    r"^(|CHANGE_?ME.*|REPLACE_?ME.*|\.\.\.|<[^>]+>|\$\{?[A-Za-z_][A-Za-z0-9_]*.*)$"
)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def walk(node, path=()):
    """Yield (path, key, value) for every mapping entry in a nested structure."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*path, i))


def readme_text() -> str:
    assert README.is_file(), "infra/README.md is missing"
    return README.read_text()


def readme_image() -> str:
    """The image tag the README tells users to build (the single source of truth)."""
    match = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", readme_text())
    assert match, "README must show `docker build -f infra/Dockerfile -t IMAGE .`"
    return match.group(1)


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


def pyproject_pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{name}==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml has no `{name}==` pin")


# --------------------------------------------------------------------------- #
# Ray cluster launcher configs
# --------------------------------------------------------------------------- #


def ray_ids(paths):
    return [p.name for p in paths]


def test_ray_cluster_configs_exist():
    names = {p.name for p in RAY_YAMLS}
    assert {"cluster-aws.yaml", "cluster-onprem.yaml"} <= names


@pytest.mark.parametrize("path", RAY_YAMLS, ids=ray_ids(RAY_YAMLS))
def test_ray_yaml_matches_ray_schema(path):
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(load_yaml(path), schema)


@pytest.mark.parametrize("path", RAY_YAMLS, ids=ray_ids(RAY_YAMLS))
def test_ray_yaml_survives_ray_config_preparation(path):
    """Run Ray's own config pipeline as far as it goes without a cloud.

    `ray up` calls commands._bootstrap_config: prepare_config (fillout_defaults
    + merge_setup_commands + validate_docker_config +
    fill_node_type_min_max_workers, or prepare_local for on-prem), then the
    provider's fillout_available_node_types_resources, validate_config and the
    provider's bootstrap_config. For the local provider all of it is offline,
    so the whole function runs. For AWS the two provider steps need boto3,
    credentials and network (instance-type lookup, IAM/subnet/key-pair setup),
    so only the provider-independent steps run here; `ray up --no-config-cache`
    does the rest (infra/README.md).
    """
    from ray.autoscaler._private import commands
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(path)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    if config["provider"]["type"] == "local":
        bootstrapped = commands._bootstrap_config(copy.deepcopy(config), no_config_cache=True)
        validate_config(bootstrapped)
    for name, node_type in prepared["available_node_types"].items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["max_workers"] <= prepared["max_workers"], name


def _ray_start_args(command: str) -> list[str]:
    """Arguments of the `ray start ...` part of a (possibly compound) shell command."""
    for part in command.split(";"):
        words = shlex.split(part)
        if words[:2] == ["ray", "start"]:
            return words[2:]
    raise AssertionError(f"no `ray start` in {command!r}")


@pytest.mark.parametrize("path", RAY_YAMLS, ids=ray_ids(RAY_YAMLS))
def test_ray_start_commands_parse_with_ray_cli(path):
    from ray.scripts.scripts import start

    config = load_yaml(path)
    head = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1
    assert len(workers) == 1
    head_params = start.make_context("start", _ray_start_args(head[0])).params
    assert head_params["head"] is True
    # Dashboard and job API on loopback only: reached through `ray dashboard`.
    assert head_params["dashboard_host"] == "127.0.0.1"
    assert head_params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    worker_params = start.make_context("start", _ray_start_args(workers[0])).params
    assert worker_params["head"] is False
    assert worker_params["address"] == "$RAY_HEAD_IP:6379"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
@pytest.mark.parametrize("path", RAY_YAMLS, ids=ray_ids(RAY_YAMLS))
def test_ray_yaml_shell_commands_are_valid_bash(path):
    config = load_yaml(path)
    keys = [
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ]
    commands = [c for key in keys for c in config.get(key) or []]
    for node_type in (config.get("available_node_types") or {}).values():
        commands += node_type.get("initialization_commands", [])
        commands += node_type.get("worker_setup_commands", [])
    assert commands
    for command in commands:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


@pytest.mark.parametrize("path", RAY_YAMLS, ids=ray_ids(RAY_YAMLS))
def test_ray_yaml_uses_the_fbft_image(path):
    config = load_yaml(path)
    docker = config["docker"]
    assert docker["image"] == readme_image()
    assert "head_image" not in docker
    assert "worker_image" not in docker
    for node_type in (config.get("available_node_types") or {}).values():
        assert "worker_image" not in node_type.get("docker", {})
    assert docker.get("pull_before_run") is True
    assert config["idle_timeout_minutes"] > 0


def _worker_run_options(config: dict, node_type: dict) -> list[str]:
    docker = config["docker"]
    return (
        docker.get("run_options", [])
        + docker.get("worker_run_options", [])
        + node_type.get("docker", {}).get("worker_run_options", [])
    )


def test_aws_cluster_has_cpu_head_and_autoscaling_gpu_workers():
    config = load_yaml(INFRA / "ray" / "cluster-aws.yaml")
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "trials must not be scheduled on the head"
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "head should be CPU"
    assert "--gpus all" not in config["docker"].get("run_options", [])
    assert "--gpus all" not in config["docker"].get("head_run_options", [])

    workers = {n: t for n, t in node_types.items() if n != config["head_node_type"]}
    gpu_workers = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no GPU worker group"
    for name, node_type in gpu_workers.items():
        assert node_type["min_workers"] == 0, f"{name} must scale from zero"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        assert node_type["max_workers"] >= 1
        assert re.match(r"^(g|p)\d", node_type["node_config"]["InstanceType"]), name
        assert node_type["resources"]["CPU"] >= 1
        assert "--gpus all" in _worker_run_options(config, node_type)


def test_onprem_cluster_is_local_provider_with_gpu_workers():
    config = load_yaml(INFRA / "ray" / "cluster-onprem.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"]
    assert provider["worker_ips"]
    # prepare_local rejects node types: the local provider makes its own.
    assert "available_node_types" not in config
    assert 0 < config["max_workers"] <= len(provider["worker_ips"])
    assert "--gpus all" in _worker_run_options(config, {})
    assert "--gpus all" not in config["docker"].get("head_run_options", [])


# --------------------------------------------------------------------------- #
# Kubernetes (KubeRay) manifests
# --------------------------------------------------------------------------- #


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in k8s_manifest_files() for doc in load_yaml_all(path)]


def k8s_by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_docs() if doc.get("kind") == kind]


def the_raycluster() -> dict:
    (cluster,) = k8s_by_kind("RayCluster")
    return cluster


def the_rayjob() -> dict:
    (job,) = k8s_by_kind("RayJob")
    return job


def ray_pod_specs(cluster_spec: dict) -> dict[str, dict]:
    pods = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec.get("workerGroupSpecs", []):
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def all_cluster_specs() -> list[dict]:
    specs = [the_raycluster()["spec"]]
    job_spec = the_rayjob()["spec"]
    if "rayClusterSpec" in job_spec:
        specs.append(job_spec["rayClusterSpec"])
    return specs


def test_k8s_manifests_parse_with_expected_kinds():
    docs = k8s_docs()
    assert docs
    for path, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        assert doc["metadata"].get("name"), path
    kinds = {doc["kind"]: doc["apiVersion"] for _, doc in docs}
    assert kinds["RayCluster"] == "ray.io/v1"
    assert kinds["RayJob"] == "ray.io/v1"
    assert len(k8s_by_kind("RayCluster")) == 1
    assert len(k8s_by_kind("RayJob")) == 1


def test_raycluster_head_cpu_and_autoscaling_gpu_workers():
    from ray.scripts.scripts import start

    ray_start_options = {p.name.replace("_", "-") for p in start.params}
    for spec in all_cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0"
        head_container = head["template"]["spec"]["containers"][0]
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in head_container["resources"].get(section, {})
        gpu_groups = [
            g
            for g in spec["workerGroupSpecs"]
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
        ]
        assert gpu_groups, "no worker group with nvidia.com/gpu limits"
        for group in gpu_groups:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
            if "nvidia.com/gpu" in resources.get("requests", {}):
                assert (
                    resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
                )
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
            assert group["maxReplicas"] >= 1
        for group in [head, *spec["workerGroupSpecs"]]:
            unknown = set(group.get("rayStartParams", {})) - ray_start_options
            assert not unknown, f"not `ray start` options: {unknown}"
            assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())


def test_ray_versions_agree():
    import ray

    version = dockerfile_args()["RAY_VERSION"]
    assert version == ray.__version__, "image Ray must match the client Ray (ray up/job submit)"
    for spec in all_cluster_specs():
        assert spec["rayVersion"] == version


def test_k8s_uses_the_fbft_image_everywhere():
    image = readme_image()
    images = [
        value
        for _, doc in k8s_docs()
        for _, key, value in walk(doc)
        if key == "image" and isinstance(value, str)
    ]
    assert images, "no container image in the manifests"
    assert set(images) == {image}


def test_k8s_volumes_data_read_only_and_cache_shared():
    claims = {doc["metadata"]["name"] for doc in k8s_by_kind("PersistentVolumeClaim")}
    for spec in all_cluster_specs():
        for group, pod in ray_pod_specs(spec).items():
            volumes = {v["name"]: v for v in pod["volumes"]}
            container = pod["containers"][0]
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/data"].get("readOnly") is True, group
            assert "/cache" in mounts, group
            data = volumes[mounts["/data"]["name"]]
            cache = volumes[mounts["/cache"]["name"]]
            assert data["persistentVolumeClaim"]["claimName"] in claims
            assert data["persistentVolumeClaim"].get("readOnly") is True
            assert cache["persistentVolumeClaim"]["claimName"] in claims
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["HF_HOME"]["value"].startswith("/cache/"), group
            assert pod["securityContext"]["runAsNonRoot"] is True


def test_rayjob_runs_the_few_shot_study():
    job = the_rayjob()
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    assert argv[1].endswith("studies/few_shot.py")

    def value(flag: str) -> str:
        assert flag in argv, f"entrypoint lacks {flag}"
        return argv[argv.index(flag) + 1]

    assert argv[argv.index("--shots") + 1 : argv.index("--shots") + 4] == ["5", "10", "50"]
    assert value("--tracking-uri").startswith(("http://", "https://"))
    assert value("--storage").startswith("s3://")
    assert value("--cache-dir").startswith("/cache")
    assert value("--data").startswith("/data")
    assert value("--format") == "visa"
    assert float(value("--gpus-per-trial")) == 0.25
    if "clusterSelector" in spec:
        assert spec["clusterSelector"]["ray.io/cluster"] == the_raycluster()["metadata"]["name"]
        assert job["metadata"]["namespace"] == the_raycluster()["metadata"]["namespace"]
    else:
        assert "rayClusterSpec" in spec


def test_k8s_credentials_only_from_secret_refs():
    for path, doc in k8s_docs():
        assert doc["kind"] != "Secret", f"{path}: Secrets are created by hand, never committed"
        for _, key, value in walk(doc):
            if key != "env":
                continue
            for var in value:
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var, f"{path}: literal value for {var['name']}"
                    assert "secretKeyRef" in var["valueFrom"], f"{path}: {var['name']}"
    # Every credential the README tells users to put in the Secret is wired in.
    env_names = {
        var["name"]
        for spec in all_cluster_specs()
        for pod in ray_pod_specs(spec).values()
        for var in pod["containers"][0].get("env", [])
        if "valueFrom" in var
    }
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} <= env_names


def test_kustomization_lists_the_cluster_resources():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    for name in resources:
        assert (K8S / name).is_file(), name
    assert "raycluster.yaml" in resources
    # The RayJob is applied on its own (re-applying the cluster must not touch it).
    for path in k8s_manifest_files():
        kinds = {doc["kind"] for doc in load_yaml_all(path)}
        assert (path.name in resources) != ("RayJob" in kinds), path.name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_build_offline():
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {d["kind"] for d in docs} >= {"Namespace", "PersistentVolumeClaim", "RayCluster"}
    assert all(d["metadata"].get("namespace", "fbft") == "fbft" for d in docs)


# --------------------------------------------------------------------------- #
# MLflow tracking server
# --------------------------------------------------------------------------- #


def parse_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip().strip("'\"")
    return values


INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Docker-compose style ${VAR}, ${VAR:-default}, ${VAR:?error} substitution."""

    def sub(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"${{{name}}} is not set in .env.example")

    return INTERPOLATION.sub(sub, text)


def compose() -> dict:
    return load_yaml(COMPOSE)


def env_example() -> dict[str, str]:
    return parse_env_file(MLFLOW / ".env.example")


def test_compose_parses_with_expected_services():
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow", "nginx"} <= services.keys()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for net in service.get("networks", []):
            assert net in compose()["networks"], f"{name}: unknown network {net}"


def compose_strings(node) -> list[str]:
    """Every string in the parsed compose file (comments are not interpolated)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*compose_strings(k), *compose_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in compose_strings(v)]
    return [node] if isinstance(node, str) else []


def test_compose_variables_are_all_defined_in_env_example():
    env = env_example()
    strings = compose_strings(compose())
    used = set()
    for text in strings:
        for match in INTERPOLATION.finditer(text):
            name, op = match.group(1), match.group(2)
            used.add(name)
            assert name in env or op in (":-", "-"), f"${{{name}}} missing from .env.example"
        interpolate(text, env)  # raises on an unset required variable
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"} <= used


def mlflow_server_params() -> dict:
    import mlflow.cli

    command = compose()["services"]["mlflow"]["command"]
    assert isinstance(command, list), "use the exec (list) form for the mlflow command"
    argv = [interpolate(str(arg), env_example()) for arg in command]
    assert argv[:2] == ["mlflow", "server"]
    # The installed MLflow's own CLI parser: unknown or malformed flags fail here.
    return mlflow.cli.server.make_context("server", argv[2:]).params


def test_compose_mlflow_uses_postgres_and_proxied_s3_artifacts():
    params = mlflow_server_params()
    backend = urlparse(params["backend_store_uri"])
    assert backend.scheme.startswith("postgresql")
    assert backend.password is None, "no password in the URI (libpq reads PGPASSWORD)"
    assert params["artifacts_destination"].startswith("s3://")
    assert params["serve_artifacts"] is True
    assert params["allowed_hosts"] and params["allowed_hosts"].strip() != "*"
    env = compose()["services"]["mlflow"]["environment"]
    assert env["PGPASSWORD"].startswith("${")
    assert "MLFLOW_S3_ENDPOINT_URL" in env


def _published_ports(service: dict) -> list[tuple[str | None, str]]:
    """(host_ip, spec) for each published port, short and long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip"), str(port)))
            continue
        spec = str(port)
        parts = spec.rsplit(":", 2)
        out.append((parts[0] if len(parts) == 3 else None, spec))
    return out


def test_compose_only_the_authenticated_proxy_is_exposed():
    services = compose()["services"]
    env = env_example()
    for name, service in services.items():
        assert "network_mode" not in service or service["network_mode"] != "host", name
        for host_ip, spec in _published_ports(service):
            if name == "nginx":
                continue
            assert host_ip == "127.0.0.1", f"{name} publishes {spec} beyond loopback"
    for name in ("postgres",):
        assert not services[name].get("ports"), f"{name} must not be published"
    assert compose()["networks"]["backend"].get("internal") is True
    assert "backend" in services["postgres"]["networks"]
    assert "frontend" not in services["postgres"]["networks"]
    nginx_ports = [interpolate(spec, env) for _, spec in _published_ports(services["nginx"])]
    assert any(p.endswith(":443:443") for p in nginx_ports)
    # The proxy is exposed, so it must authenticate and encrypt (checked below).
    nginx_mounts = " ".join(services["nginx"]["volumes"])
    assert "default.conf.template" in nginx_mounts
    assert "htpasswd" in nginx_mounts


def test_compose_secrets_come_from_env_file():
    for name, service in compose()["services"].items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[?-][^}]*)?\}", str(value)), (
                    f"{name}.{key} must be interpolated from .env, got {value!r}"
                )


def test_env_examples_hold_only_placeholders():
    examples = sorted(INFRA.rglob("*.env.example")) + sorted(INFRA.rglob(".env.example"))
    assert examples
    for path in set(examples):
        for key, value in parse_env_file(path).items():
            if SECRET_NAME.search(key):
                assert PLACEHOLDER.match(value), f"{path}: {key} must be a placeholder"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_local_secret_files_are_git_ignored():
    for rel in (
        "infra/mlflow/.env",
        "infra/mlflow/htpasswd",
        "infra/mlflow/certs/tls.key",
        "infra/mlflow/certs/tls.crt",
    ):
        result = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT)
        assert result.returncode == 0, f"{rel} is not git-ignored"
    result = subprocess.run(["git", "check-ignore", "-q", "infra/mlflow/.env.example"], cwd=ROOT)
    assert result.returncode == 1, ".env.example must be committed"


def nginx_servers(text: str) -> list[str]:
    """Bodies of the top-level `server { ... }` blocks."""
    bodies, i = [], 0
    while (m := re.compile(r"^server\s*\{", re.MULTILINE).search(text, i)) is not None:
        depth, j = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        bodies.append(text[m.end() : j - 1])
        i = j
    return bodies


def test_nginx_proxy_requires_tls_and_basic_auth():
    text = "\n".join(
        line
        for line in NGINX_TEMPLATE.read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    servers = nginx_servers(text)
    tls = [s for s in servers if re.search(r"listen\s+443\s+ssl", s)]
    assert len(tls) == 1
    body = tls[0]
    assert re.search(r"^\s*auth_basic\s+\"[^\"]+\";", body, re.MULTILINE)
    assert re.search(r"^\s*auth_basic_user_file\s+\S+;", body, re.MULTILINE)
    assert "ssl_certificate " in body
    assert "ssl_certificate_key " in body
    # auth may be switched off only for the health probe
    for location in re.findall(r"location\s+([^{]+)\{([^}]*)\}", body):
        if "auth_basic off" in location[1]:
            assert location[0].strip() == "= /health"
    for server in servers:
        if server is not body:
            assert "proxy_pass" not in server, "plain-HTTP server must only redirect"


@pytest.mark.skipif(
    shutil.which("nginx") is None or shutil.which("openssl") is None,
    reason="nginx/openssl not installed",
)
def test_nginx_config_passes_nginx_t(tmp_path):
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    major_minor = tuple(int(x) for x in re.search(r"nginx/(\d+)\.(\d+)", version).groups())
    rendered = interpolate(
        NGINX_TEMPLATE.read_text(),
        {"MLFLOW_PUBLIC_HOSTNAME": "mlflow.example.com", "MLFLOW_UPSTREAM": "127.0.0.1:5000"},
    )
    if major_minor < (1, 25):  # `http2 on;` is 1.25.1+; the image runs nginx 1.29
        rendered = rendered.replace("http2 on;", "")
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=mlflow.example.com",
            "-keyout", str(certs / "tls.key"), "-out", str(certs / "tls.crt"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    rendered = rendered.replace("/etc/nginx/certs/", f"{certs}/").replace(
        "/etc/nginx/htpasswd", str(tmp_path / "htpasswd")
    )
    (tmp_path / "htpasswd").write_text("user:$apr1$placeholder$000000000000000000000\n")
    (tmp_path / "mlflow.conf").write_text(rendered)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        "events {}\n"
        f"http {{ access_log off; include {tmp_path}/mlflow.conf; }}\n"
    )
    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def systemd_directives(path: Path) -> dict[str, list[str]]:
    """Directives of a unit file, backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_binds_loopback_and_reads_an_environment_file():
    directives = systemd_directives(SYSTEMD_UNIT)
    (env_file,) = directives["EnvironmentFile"]
    assert env_file.lstrip("-").startswith("/etc/")
    assert directives["User"][0] not in ("root", "0")
    (exec_start,) = directives["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/mlflow")
    assert argv[1] == "server"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--artifacts-destination" in argv
    assert "--serve-artifacts" in argv
    # Secrets stay in the EnvironmentFile: only ${VAR} references on the command line.
    backend = argv[argv.index("--backend-store-uri") + 1]
    assert backend.startswith("${")
    env = parse_env_file(MLFLOW / "systemd" / "mlflow.env.example")
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert urlparse(env["MLFLOW_BACKEND_STORE_URI"]).password is None
    for ref in re.findall(r"\$\{(\w+)\}", exec_start):
        assert ref in env, f"{ref} missing from mlflow.env.example"
    import mlflow.cli

    mlflow.cli.server.make_context(
        "server", [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a) for a in argv[2:]]
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_passes_systemd_analyze_verify():
    result = subprocess.run(
        ["systemd-analyze", "verify", str(SYSTEMD_UNIT)], capture_output=True, text=True
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # The venv only exists on the server.
        if line.strip() and "is not executable: No such file or directory" not in line
    ]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- #
# Dockerfile
# --------------------------------------------------------------------------- #


def dockerfile_env(text: str) -> dict[str, str]:
    """KEY=VALUE pairs of all ENV instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    env = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line[4:])))
    return env


def test_dockerfile_cuda_base_package_install_and_non_root_user():
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    final = froms[-1]
    if final.startswith("${"):
        final = args[final.strip("${}")]
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", final
    )
    assert args["PYTHON_VERSION"] == "3.11"
    assert args["TORCH_VERSION"] == pyproject_pin("torch")
    assert args["TORCHVISION_VERSION"] == pyproject_pin("torchvision")
    assert re.search(r"^COPY (--chown=\S+ )?\. /app$", text, re.MULTILINE)
    assert re.search(r"^RUN pip install /app\b", text, re.MULTILINE)
    assert re.search(r'"ray\[[^\]]*tune[^\]]*\]==\$\{RAY_VERSION\}"', text)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0")
    env = dockerfile_env(text)
    assert env["HF_HOME"].startswith("/cache/"), "weights must land on the cache volume"
    # The Ray cluster launcher reads HOME from the image config (else assumes /root).
    assert env["HOME"].startswith("/home/")
    assert env["PATH"].startswith("/opt/venv/bin")
    assert not re.search(r"^ENTRYPOINT", text, re.MULTILINE), "Ray/KubeRay supply the command"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = {
        line.strip()
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "mlruns", "ray_results", "**/.env"} <= patterns


# --------------------------------------------------------------------------- #
# Secrets scan and README
# --------------------------------------------------------------------------- #

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub tokens
    re.compile(r"hf_[A-Za-z0-9]{30,}"),  # Hugging Face tokens
    re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@$]+:(?!\$)[^@\s/$]+@"),  # user:password@ in URLs
]
ASSIGNMENT = re.compile(
    r"""(?P<key>[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api_key|access_key)[A-Za-z0-9_.-]*)
        ["']?\s*[:=]\s*["']?(?P<value>[^\s"',}]*)""",
    re.IGNORECASE | re.VERBOSE,
)
# Values that are references, not secrets.
SAFE_VALUE = re.compile(
    r"^(|\$.*|<.*|CHANGE_?ME.*|REPLACE_?ME.*|\.\.\..*|true|false|null|optional|"
    r"[A-Z][A-Z0-9_]*|/.*|\{.*|\[.*|secretKeyRef|valueFrom)$"
)


def infra_text_files() -> list[Path]:
    files = []
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            try:
                path.read_text()
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files


def find_secrets(text: str) -> list[str]:
    hits = [m.group(0) for pattern in SECRET_PATTERNS for m in pattern.finditer(text)]
    for m in ASSIGNMENT.finditer(text):
        if not SAFE_VALUE.match(m.group("value")):
            hits.append(m.group(0))
    return hits


def test_no_literal_secrets_anywhere_under_infra():
    files = infra_text_files()
    assert len(files) > 10
    for path in files:
        # .env / htpasswd / certs would be local files; they must not exist in the tree
        # that gets committed (git-ignored) -- skip them if a developer has them locally.
        if path.name in (".env", "htpasswd") or "certs" in path.parts:
            continue
        hits = find_secrets(path.read_text())
        assert not hits, f"{path.relative_to(ROOT)}: {hits}"


def test_secret_scan_detects_literals():
    samples = [
        "POSTGRES_PASSWORD=hunter2hunter2",
        "  password: s3cr3t-value",
        "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "url: postgresql://mlflow:hunter2@db:5432/mlflow",
    ]
    for sample in samples:
        assert find_secrets(sample), sample
    for ok in [
        "POSTGRES_PASSWORD=CHANGE_ME",
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}",
        "secretKeyRef: {name: fbft-credentials, key: AWS_SECRET_ACCESS_KEY, optional: true}",
        "postgresql://${POSTGRES_USER}@postgres:5432/${POSTGRES_DB}",
    ]:
        assert not find_secrets(ok), ok


def test_readme_covers_the_workflow():
    text = readme_text()
    for needle in [
        "docker build -f infra/Dockerfile",
        "docker push",
        "ray up infra/ray/cluster-aws.yaml",
        "ray dashboard infra/ray/cluster-aws.yaml",
        "ray job submit --address http://127.0.0.1:8265",
        "--address auto",
        "kubectl apply -k infra/k8s",
        "kubectl apply -f infra/k8s/rayjob-few-shot.yaml",
        "--dry-run=server",
        "--no-config-cache",
        "docker compose",
        "--tracking-uri",
        "--storage",
        "--cache-dir",
        "--gpus-per-trial 0.25",
        "--resume",
        "s3://",
    ]:
        assert needle in text, f"README lacks {needle!r}"
    for rel in sorted(set(re.findall(r"\binfra/[\w./-]+[\w/]", text))):
        assert (ROOT / rel).exists(), f"README refers to missing {rel}"


def few_shot_flags_in_docs() -> set[str]:
    commands = [the_rayjob()["spec"]["entrypoint"]]
    commands += re.findall(r"studies/few_shot\.py[^\n]*(?:\\\n[^\n]*)*", readme_text())
    return {flag for command in commands for flag in re.findall(r"(?<!\S)--[a-z][\w-]*", command)}


@pytest.mark.skipif(
    not (ROOT / "studies" / "few_shot.py").is_file(), reason="studies/few_shot.py not there yet"
)
def test_documented_study_flags_exist():
    """Every flag the RayJob and README pass to studies/few_shot.py is one it accepts."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "studies" / "few_shot.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    unknown = {f for f in few_shot_flags_in_docs() if f not in result.stdout}
    assert not unknown, f"studies/few_shot.py --help does not list {sorted(unknown)}"
