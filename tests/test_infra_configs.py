"""Offline checks of the deployment configs under infra/ that a reader would otherwise get wrong.

Only real validators and security properties: Ray's cluster schema and config pipeline, the
`ray start` / `mlflow server` CLI parsers, bash -n, kubectl kustomize, nginx -t,
systemd-analyze, the NetworkPolicy in front of Ray, loopback/TLS/auth of the MLflow server and
a scan for committed secrets. Values that only change when someone edits the file (image tags,
resource numbers, study flags) are not pinned here. Tools that are missing skip their check.
Nothing talks to a cloud, a cluster, a registry or a Docker engine.
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
RAY_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}

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


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


# --- Ray cluster launcher configs


def _ray_start_args(command: str) -> list[str]:
    """Arguments of the `ray start ...` part of a (possibly compound) shell command."""
    for part in command.split(";"):
        if (words := shlex.split(part))[:2] == ["ray", "start"]:
            return words[2:]
    raise AssertionError(f"no `ray start` in {command!r}")


@pytest.mark.parametrize("path", RAY_YAMLS, ids=[p.name for p in RAY_YAMLS])
def test_ray_cluster_config_passes_rays_validators(path):
    """Ray's schema, its `ray up` pipeline (commands._bootstrap_config) as far as it runs
    offline (all of it for the local provider; AWS needs credentials: `ray up
    --no-config-cache`), its `ray start` parser, and bash -n on every shell command. The
    dashboard/job API (no auth) listens on loopback only: reached through `ray dashboard`."""
    import ray.autoscaler
    from ray.autoscaler._private import commands
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.scripts.scripts import start

    config = load_yaml(path)
    schema = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema.read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))
    if config["provider"]["type"] == "local":
        validate_config(commands._bootstrap_config(copy.deepcopy(config), no_config_cache=True))

    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    (worker,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    head_params = start.make_context("start", _ray_start_args(head)).params
    assert head_params["head"] is True and head_params["dashboard_host"] == "127.0.0.1"
    assert start.make_context("start", _ray_start_args(worker)).params["head"] is False

    keys = "initialization_commands setup_commands head_setup_commands worker_setup_commands"
    keys += " head_start_ray_commands worker_start_ray_commands"
    shell = [c for key in keys.split() for c in config.get(key) or []]
    for node_type in (config.get("available_node_types") or {}).values():
        shell += node_type.get("initialization_commands", [])
        shell += node_type.get("worker_setup_commands", [])
    for command in shell if shutil.which("bash") else []:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


# --- Kubernetes (KubeRay) manifests


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in k8s_manifest_files() for doc in load_yaml_all(path)]


def k8s_by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_docs() if doc.get("kind") == kind]


def only(kind: str) -> dict:
    (doc,) = k8s_by_kind(kind)
    return doc


def ray_pod_specs(cluster_spec: dict) -> dict[str, dict]:
    pods = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec.get("workerGroupSpecs", []):
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def all_cluster_specs() -> list[dict]:
    specs = [only("RayCluster")["spec"]]
    job_spec = only("RayJob")["spec"]
    if "rayClusterSpec" in job_spec:
        specs.append(job_spec["rayClusterSpec"])
    return specs


def test_raystartparams_are_ray_start_options():
    from ray.scripts.scripts import start

    options = {p.name.replace("_", "-") for p in start.params}
    for spec in all_cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            params = group.get("rayStartParams", {})
            assert not set(params) - options, f"not `ray start` options: {set(params) - options}"
            assert all(isinstance(v, str) for v in params.values()), "KubeRay wants strings"


def test_ray_versions_agree():
    """The image's Ray must match the client's (`ray up`, `ray job submit`) and KubeRay's."""
    import ray

    version = dockerfile_args()["RAY_VERSION"]
    assert version == ray.__version__
    for spec in all_cluster_specs():
        assert spec["rayVersion"] == version


def test_k8s_pods_non_root_with_read_only_data():
    for spec in all_cluster_specs():
        for group, pod in ray_pod_specs(spec).items():
            assert pod["securityContext"]["runAsNonRoot"] is True, group
            mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
            assert mounts["/data"].get("readOnly") is True, group


def test_rayjob_targets_the_raycluster():
    job, cluster = only("RayJob"), only("RayCluster")
    selector = job["spec"].get("clusterSelector")
    if selector is not None:
        assert selector["ray.io/cluster"] == cluster["metadata"]["name"]
        assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]


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


def test_network_policy_admits_only_the_clusters_own_pods_to_ray_ports():
    """Ray's ports (GCS, client, the unpinned raylet/worker ports) only from pods of the same
    cluster; the unauthenticated dashboard/job API (8265) also from RayJob submitters and the
    KubeRay operator, nothing else. Egress stays open (MLflow, S3, Hugging Face)."""
    cluster, policy = only("RayCluster"), only("NetworkPolicy")
    own = {"podSelector": {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}}}
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert spec["podSelector"] == own["podSelector"]
    assert "Egress" not in spec["policyTypes"] or spec.get("egress") == [{}]
    pods = ray_pod_specs(cluster["spec"]).values()
    containers = [c for pod in pods for c in pod["containers"]]
    declared = {p["containerPort"] for c in containers for p in c.get("ports", [])}
    assert set(RAY_PORTS.values()) <= declared
    for port in declared:
        tcp = {"protocol": "TCP", "port": port}
        rules = [r for r in spec["ingress"] if not r.get("ports") or tcp in r["ports"]]
        peers = [peer for rule in rules for peer in rule["from"]]  # no `from` would admit all
        assert own in peers, f"port {port}: the cluster's own pods are cut off"
        wide = [p for p in peers if "ipBlock" in p or p.get("namespaceSelector") == {}]
        assert not wide, f"port {port} is open beyond the namespace and the operator: {wide}"
        if port != RAY_PORTS["dashboard"]:
            assert peers == [own], f"port {port} is open to {peers}"


def test_kustomization_lists_the_cluster_resources():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    for name in resources:
        assert (K8S / name).is_file(), name
    assert {"raycluster.yaml", "networkpolicy.yaml"} <= set(resources)
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
    assert {d["kind"] for d in docs} >= {"Namespace", "RayCluster", "NetworkPolicy"}
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"] == only("NetworkPolicy")["spec"]["podSelector"]
    assert all(d["metadata"].get("namespace", "fbft") == "fbft" for d in docs)


# --- MLflow tracking server


INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def parse_env_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    pairs = [line.partition("=") for line in lines if line and not line.startswith("#")]
    assert all(sep for _, sep, _ in pairs), f"{path}: every line must be KEY=VALUE"
    return {key.strip(): value.strip().strip("'\"") for key, _, value in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Docker-compose ${VAR}, ${VAR:-default}, ${VAR:?error}; a required unset one fails."""

    def sub(match: re.Match) -> str:
        name, op, arg = match.groups()
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        assert op in (":-", "-"), f"${{{name}}} is not set in the example env file"
        return arg

    return INTERPOLATION.sub(sub, text)


def compose() -> dict:
    return load_yaml(COMPOSE)


def test_compose_resolves_and_mlflow_cli_accepts_its_command():
    """Every ${VAR} of compose.yaml resolves from .env.example; the installed MLflow parses the
    server flags; no password in the backend URI (libpq reads PGPASSWORD); allowed hosts set."""
    import mlflow.cli

    env = parse_env_file(MLFLOW / ".env.example")
    interpolate(json.dumps(compose()), env)
    command = compose()["services"]["mlflow"]["command"]
    argv = [interpolate(str(arg), env) for arg in command]
    assert argv[:2] == ["mlflow", "server"], "use the exec (list) form"
    params = mlflow.cli.server.make_context("server", argv[2:]).params
    assert urlparse(params["backend_store_uri"]).password is None
    assert params["allowed_hosts"] and params["allowed_hosts"].strip() != "*"


def test_compose_only_the_authenticated_proxy_is_exposed():
    """MLflow, MinIO and Postgres publish nothing beyond 127.0.0.1; nginx (TLS + auth) does."""
    config = compose()
    for name, service in config["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else None
            if isinstance(port, str) and port.count(":") == 2:
                host_ip = port.split(":")[0]
            assert name == "nginx" or host_ip == "127.0.0.1", f"{name} publishes {port}"
    assert not config["services"]["postgres"].get("ports")
    assert config["networks"]["backend"].get("internal") is True


def test_env_examples_hold_only_placeholders():
    examples = sorted(INFRA.rglob("*.env.example")) + sorted(INFRA.rglob(".env.example"))
    assert examples
    for path in set(examples):
        for key, value in parse_env_file(path).items():
            if SECRET_NAME.search(key):
                assert PLACEHOLDER.match(value), f"{path}: {key} must be a placeholder"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_local_secret_files_are_git_ignored():
    for rel in ("infra/mlflow/.env", "infra/mlflow/htpasswd", "infra/mlflow/certs/tls.key"):
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
    assert "ssl_certificate " in body and "ssl_certificate_key " in body
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
    openssl = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=mlflow.example.com"
    argv = [*openssl.split(), "-keyout", certs / "tls.key", "-out", certs / "tls.crt"]
    subprocess.run(argv, check=True, capture_output=True)
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
    argv = ["nginx", "-t", "-p", tmp_path, "-c", tmp_path / "nginx.conf"]
    result = subprocess.run(argv, capture_output=True, text=True)
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
    assert argv[1] == "server"
    assert argv[argv.index("--host") + 1] == "127.0.0.1", "only the TLS proxy is public"
    # Secrets stay in the EnvironmentFile: only ${VAR} references on the command line.
    assert argv[argv.index("--backend-store-uri") + 1].startswith("${")
    env = parse_env_file(MLFLOW / "systemd" / "mlflow.env.example")
    import mlflow.cli

    mlflow.cli.server.make_context("server", [interpolate(a, env) for a in argv[2:]])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_passes_systemd_analyze_verify():
    argv = ["systemd-analyze", "verify", SYSTEMD_UNIT]
    result = subprocess.run(argv, capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()  # the venv only exists on the server
    problems = [line for line in lines if line.strip() and "is not executable" not in line]
    assert not problems, "\n".join(problems)


# --- Dockerfile


def test_image_runs_non_root_and_keeps_secrets_out_of_the_build_context():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0")
    ignored = set((INFRA / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv", "**/.env"} <= ignored


# --- Secrets scan and README

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


def find_secrets(text: str) -> list[str]:
    hits = [m.group(0) for pattern in SECRET_PATTERNS for m in pattern.finditer(text)]
    for m in ASSIGNMENT.finditer(text):
        if not SAFE_VALUE.match(m.group("value")):
            hits.append(m.group(0))
    return hits


def test_no_literal_secrets_anywhere_under_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) > 10
    for path in files:  # local, git-ignored secret files a developer may have are skipped
        if path.name in (".env", "htpasswd") or "certs" in path.parts:
            continue
        hits = find_secrets(path.read_text(errors="replace"))
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


def readme_text() -> str:
    assert README.is_file(), "infra/README.md is missing"
    return README.read_text()


def test_readme_refers_to_existing_files():
    for rel in sorted(set(re.findall(r"\binfra/[\w./-]+[\w/]", readme_text()))):
        assert (ROOT / rel).exists(), f"README refers to missing {rel}"


def few_shot_flags_in_docs() -> set[str]:
    commands = [only("RayJob")["spec"]["entrypoint"]]
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


# --- MLflow on Kubernetes (infra/k8s/mlflow): what the RayJob's --tracking-uri reaches

K8S_MLFLOW = K8S / "mlflow"


def mlflow_k8s_docs() -> list[dict]:
    paths = sorted(p for p in K8S_MLFLOW.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for path in paths for doc in load_yaml_all(path)]


def _tracking_uri_of_rayjob() -> str:
    words = shlex.split(only("RayJob")["spec"]["entrypoint"])
    return words[words.index("--tracking-uri") + 1]


def test_rayjob_tracking_uri_reaches_the_authenticated_proxy_of_the_k8s_mlflow_server():
    """host mlflow.mlflow.svc:5000 -> Service `mlflow` (namespace `mlflow`) -> nginx with basic
    auth -> MLflow on the pod's loopback, backed by PostgreSQL and an artifacts volume."""
    uri = urlparse(_tracking_uri_of_rayjob())
    service, namespace = uri.hostname.split(".")[:2]
    docs = mlflow_k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "mlflow"), ("Service", service), ("Deployment", "postgres")} <= kinds
    assert sum(d["kind"] == "PersistentVolumeClaim" for d in docs) >= 1
    assert "Secret" not in {d["kind"] for d in docs}, "Secrets are created by hand"
    assert load_yaml(K8S_MLFLOW / "kustomization.yaml")["namespace"] == namespace
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == service]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == uri.port]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    pod = deploy["spec"]["template"]["spec"]
    assert (
        svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    )
    (proxy,) = [c for c in pod["containers"] if any(
        p.get("name") == port["targetPort"] for p in c.get("ports", []))]  # fmt: skip
    assert "nginx" in proxy["image"]
    (conf,) = [d for d in docs if d["kind"] == "ConfigMap"]
    text = next(iter(conf["data"].values()))
    (listen,) = [p["containerPort"] for p in proxy["ports"] if p["name"] == port["targetPort"]]
    assert re.search(rf"listen\s+{listen};", text)
    assert re.search(r"^\s*auth_basic\s+\"[^\"]+\";", text, re.MULTILINE)
    assert re.search(r"^\s*auth_basic_user_file\s+\S+;", text, re.MULTILINE)
    for location, body in re.findall(r"location\s+([^{]+)\{([^}]*)\}", text):
        if "auth_basic off" in body:
            assert location.strip() == "= /health"
    (server,) = [c for c in pod["containers"] if c.get("command", [])[:2] == ["mlflow", "server"]]
    args = server["command"]
    host, mlflow_port = args[args.index("--host") + 1], args[args.index("--port") + 1]
    assert host == "127.0.0.1", "MLflow must be reachable only through the proxy"
    assert f"proxy_pass http://127.0.0.1:{mlflow_port};" in text
    assert "--serve-artifacts" in args and args[args.index("--backend-store-uri") + 1].startswith(
        "postgresql://"
    )
    import mlflow.cli

    params = mlflow.cli.server.make_context("server", args[2:]).params  # the installed parser
    assert urlparse(params["backend_store_uri"]).password is None
    assert uri.hostname in params["allowed_hosts"].split(",") or f"{uri.hostname}:{uri.port}" in (
        params["allowed_hosts"].split(",")
    )


def test_k8s_mlflow_credentials_only_from_secret_refs():
    for doc in mlflow_k8s_docs():
        for _, key, value in walk(doc):
            if key != "env":
                continue
            for var in value:
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], var


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_k8s_mlflow_kustomize_build_offline():
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S_MLFLOW)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(result.stdout) if d and
            d["kind"] != "Namespace"} == {"mlflow"}  # fmt: skip
