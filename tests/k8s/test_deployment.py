"""The deployment as a cluster would run it (issue 15), read from the rendered overlays.

test_manifests.py checks each object on its own; this file checks what the objects
do together, one group per defect the issue found:

1. the submitter needs no JVM: its command line, with env substituted as the kubelet
   does, parsed by the launcher itself, starts nothing and reads Pub/Sub in Python;
2. NetworkPolicies: an evaluator of Kubernetes' semantics is asked about every
   connection the job's flags name, and about some that must stay closed;
3. read-only root filesystems: what each container's command writes lies on a
   writable volume, and the submitter stages nothing;
4. the gke overlay's requests fit the cluster k8s/README.md creates, with room for
   GKE's system pods and a rolling update; the README's figures match the overlays;
5. the SavedModel loads with the TensorFlow that tensorflow/serving:2.19.1 ships (a
   cached venv: `make tf-serving-venv`) and gives the labels the project's own
   TensorFlow gives.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from launcher.flink import FlinkLaunch
from launcher.jars import cache_dir
from tests.k8s.test_manifests import (
    K8S,
    NAMESPACE,
    OVERLAYS,
    ROOT,
    WRITABLE_ROOT,
    Obj,
    args_of,
    by_kind,
    containers,
    flink_resource,
    one,
    pod_specs,
    render,
    selects,
)


@functools.cache
def rendered(name: str) -> list[Obj]:
    return render(K8S / "overlays" / name)


# --- containers as the kubelet starts them --------------------------------------------

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` replaced as the kubelet does (unknown names stay, ``$$`` escapes)."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                    text)


def container_env(objs: list[Obj], c: Obj) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[e["name"]] = one(objs, "ConfigMap", key["name"])["data"][key["key"]]
        else:  # a Secret, a field of the pod: a value only the cluster knows
            env[e["name"]] = f"<{e['name']}>"
    return env


def command_line(objs: list[Obj], c: Obj) -> list[str]:
    env = container_env(objs, c)
    return [expand(a, env) for a in args_of(c)]


def value(argv: list[str], name: str) -> str:
    found = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(found) == 1, f"expected one --{name}= in {argv}"
    return found[0]


def container(objs: list[Obj], where: str, name: str) -> Obj:
    (spec,) = [s for w, _, s in pod_specs(objs) if w == where]
    (c,) = [c for _, c in containers(spec) if c["name"] == name]
    return c


def submitter_argv(objs: list[Obj]) -> list[str]:
    """The launcher's arguments in Job/pipeline-submit, env substituted."""
    argv = command_line(objs, container(objs, "Job/pipeline-submit", "submit"))
    assert argv[:4] == ["python", "-m", "launcher", "flink"], argv
    unresolved = [a for a in argv if "$(" in a]
    assert not unresolved, f"the kubelet would pass these as they are: {unresolved}"
    return argv[4:]


# --- 1. the submitter needs no JVM ------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_submitter_needs_no_jvm_and_no_expansion_service(name):
    """What `launcher.flink.flink_job` would start for this command line: a Java job
    server (a jar), an expansion service (a jar), a worker pool. The pipeline image
    has neither a JVM nor the jars, so it must start none of them."""
    from pipeline.pipeline import make_options, profile_of
    from runners.profiles import PULL

    objs = rendered(name)
    launch = FlinkLaunch.parse(submitter_argv(objs))
    assert launch.job_server_jar is None, "the launcher would start a job server (java -jar)"
    assert not launch.local_workers, "the launcher would start a worker pool"
    assert launch.flags.detach, "with --job_endpoint the submitter submits and exits"
    argv = launch.argv()
    assert not [a for a in argv if a.endswith(".jar") or a.startswith("--beam_services")], argv
    if launch.reads_pubsub_xlang:
        # Then the expansion service must be one in the cluster, running the Java
        # read EMBEDDED in the Flink JVM (the job server's built-in one uses Docker).
        address = launch.flags.expansion_service
        assert address, "--pubsub_read=xlang without --expansion_service: java -jar in the pod"
        pods, _ = endpoints(objs, address)
        for pod in pods:
            (spec,) = [s for w, _, s in pod_specs(objs) if w == pod.name]
            flags = [a for _, c in containers(spec) for a in command_line(objs, c)]
            assert "--defaultEnvironmentType=EMBEDDED" in flags, f"{pod.name}: {flags}"
    else:
        # The graph the job server gets reads Pub/Sub with the Python pull source.
        options = make_options(argv)
        assert options.is_pubsub
        assert profile_of(options).pubsub_read == PULL


# --- 2. NetworkPolicies ------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: its namespace, labels and named ports."""

    name: str
    labels: tuple[tuple[str, str], ...]
    namespace: str = NAMESPACE
    ports: tuple[tuple[str, int], ...] = ()

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class Host:
    """An address outside the cluster's pods."""

    name: str
    ip: str


Peer = Pod | Host

KUBE_DNS = Pod("kube-dns", (("k8s-app", "kube-dns"),), "kube-system")
OPERATOR = Pod("the Flink operator", (("app.kubernetes.io/name", "flink-kubernetes-operator"),),
               "flink-operator")
INGRESS_CONTROLLER = Pod("an ingress controller", (("app.kubernetes.io/name", "ingress-nginx"),),
                         "ingress-nginx")
STRANGER = Pod("a pod of another namespace", (("app", "other"),), "default")
# Google's API addresses are not stable: any public address stands for them.
PUBSUB = Host("pubsub.googleapis.com", "142.250.4.95")
STORAGE = Host("storage.googleapis.com", "142.250.4.207")
X_API = Host("api.x.com", "104.244.42.66")
ELSEWHERE = Host("another address on the internet", "93.184.215.14")
# The JobManager reaches the API server at the `kubernetes` Service's endpoint:
# 6443 on kind's control-plane node, 443 on GKE's control plane.
API_SERVER = {"dev": (Host("the API server", "172.18.0.2"), 6443),
              "gke": (Host("the API server", "172.16.0.2"), 443)}
# Workload Identity: the GKE metadata server (169.254.169.252:988 on Dataplane V2).
METADATA = [(Host("the GKE metadata server", "169.254.169.254"), 80),
            (Host("the GKE metadata server", "169.254.169.252"), 988)]


def pods(objs: list[Obj]) -> dict[str, Pod]:
    """Every pod the render would create, by where it comes from. Flink's pods also
    carry the labels Flink's native mode adds (app, component, type)."""
    out = {}
    for where, meta, spec in pod_specs(objs):
        labels = dict(meta.get("labels", {}))
        if where.startswith("FlinkDeployment/"):
            _, cluster, role = where.split("/")
            labels |= {"app": cluster, "component": role.lower(),
                       "type": "flink-native-kubernetes"}
        named = {p["name"]: p["containerPort"]
                 for _, c in containers(spec) for p in c.get("ports", []) if "name" in p}
        out[where] = Pod(where, tuple(sorted(labels.items())), NAMESPACE,
                         tuple(sorted(named.items())))
    return out


def endpoints(objs: list[Obj], address: str) -> tuple[list[Pod], int]:
    """The pods behind a HOST:PORT a flag names (a Service of the render, or the REST
    Service the operator creates for a FlinkDeployment), and the port they receive on:
    NetworkPolicies see the connection after the Service's translation."""
    address = re.sub(r"^(dns:///|https?://)", "", address).split("/")[0]
    host, port = address.rsplit(":", 1)
    host, port = host.split(".")[0], int(port)
    everything = pods(objs)
    for flink in by_kind(objs, "FlinkDeployment"):
        cluster = flink["metadata"]["name"]
        if host == f"{cluster}-rest":
            rest = int(flink["spec"]["flinkConfiguration"].get("rest.port", 8081))
            assert port == rest, f"{address}: Flink's REST port is {rest}"
            return [everything[f"FlinkDeployment/{cluster}/jobManager"]], rest
    service = one(objs, "Service", host)
    matching = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert matching, f"{address}: Service/{host} has no port {port}"
    selected = [p for p in everything.values() if selects(service["spec"]["selector"], p.label_map)]
    assert selected, f"{address}: Service/{host} selects no pod"
    target = matching[0].get("targetPort", port)
    if isinstance(target, str):
        target = dict(selected[0].ports)[target]
    return selected, int(target)


def _policy_types(policy: Obj) -> set[str]:
    spec = policy["spec"]
    return set(spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else []))


def _isolating(objs: list[Obj], pod: Pod, direction: str) -> list[Obj]:
    """The policies that select ``pod`` for ``direction``: any one isolates it there.
    Other namespaces' policies are not ours to know: their pods count as open."""
    return [p for p in by_kind(objs, "NetworkPolicy")
            if p["metadata"].get("namespace", NAMESPACE) == pod.namespace
            and direction in _policy_types(p) and selects(p["spec"]["podSelector"], pod.label_map)]


def _peer_matches(peer: Obj, other: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        # Meant for addresses outside the cluster; pod addresses are not matched here.
        if not isinstance(other, Host):
            return False
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
    if isinstance(other, Host):
        return False
    namespaces = peer.get("namespaceSelector")
    in_namespace = (other.namespace == policy_namespace if namespaces is None else
                    selects(namespaces, {"kubernetes.io/metadata.name": other.namespace}))
    return in_namespace and selects(peer.get("podSelector", {}), other.label_map)


def _port_matches(rule_port: Obj, port: int, protocol: str, dst: Peer) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    wanted = rule_port.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):  # a named port of the destination's containers
        return isinstance(dst, Pod) and dict(dst.ports).get(wanted) == port
    return wanted <= port <= rule_port.get("endPort", wanted)


def _allows(policy: Obj, rule: Obj, peer_key: str, peer: Peer, port: int, protocol: str,
            dst: Peer) -> bool:
    peers = rule.get(peer_key) or []  # absent or empty: every peer
    namespace = policy["metadata"].get("namespace", NAMESPACE)
    if peers and not any(_peer_matches(p, peer, namespace) for p in peers):
        return False
    ports = rule.get("ports") or []  # absent or empty: every port
    return not ports or any(_port_matches(p, port, protocol, dst) for p in ports)


def reachable(objs: list[Obj], src: Peer, dst: Peer, port: int,
              protocol: str = "TCP") -> str | None:
    """None when the NetworkPolicies let ``src`` open a connection to ``dst:port``;
    else why not. Both ends count: the source's egress and the destination's ingress."""
    if isinstance(src, Pod):
        policies = _isolating(objs, src, "Egress")
        if policies and not any(_allows(p, r, "to", dst, port, protocol, dst)
                                for p in policies for r in p["spec"].get("egress", [])):
            return (f"no egress rule of {[p['metadata']['name'] for p in policies]} lets "
                    f"{src.name} out to {dst.name}:{port}/{protocol}")
    if isinstance(dst, Pod):
        policies = _isolating(objs, dst, "Ingress")
        if policies and not any(_allows(p, r, "from", src, port, protocol, dst)
                                for p in policies for r in p["spec"].get("ingress", [])):
            return (f"no ingress rule of {[p['metadata']['name'] for p in policies]} lets "
                    f"{src.name} in to {dst.name}:{port}/{protocol}")
    return None


@dataclass(frozen=True)
class Connection:
    why: str
    src: Peer
    dst: Peer
    port: int
    protocol: str = "TCP"


def _flink(objs: list[Obj]) -> tuple[Obj, Pod, Pod]:
    (flink,) = by_kind(objs, "FlinkDeployment")
    everything = pods(objs)
    name = flink["metadata"]["name"]
    return (flink, everything[f"FlinkDeployment/{name}/jobManager"],
            everything[f"FlinkDeployment/{name}/taskManager"])


def _pubsub(objs: list[Obj], src: Pod, env: dict[str, str], why: str) -> list[Connection]:
    """A Pub/Sub client's connections: the emulator PUBSUB_EMULATOR_HOST names, or
    Google's API with Workload Identity's tokens from the metadata server."""
    if "PUBSUB_EMULATOR_HOST" in env:
        dsts, port = endpoints(objs, env["PUBSUB_EMULATOR_HOST"])
        return [Connection(f"{why} (emulator)", src, d, port) for d in dsts]
    return [Connection(why, src, PUBSUB, 443),
            *(Connection(f"{why}: credentials", src, h, p) for h, p in METADATA)]


def required_connections(name: str, objs: list[Obj]) -> list[Connection]:
    """Every connection the deployment needs, from the flags and env that name them."""
    everything = pods(objs)
    flink, jobmanager, taskmanager = _flink(objs)
    conf = flink["spec"]["flinkConfiguration"]
    conns: list[Connection] = []

    def to(src: Pod, address: str, why: str) -> None:
        dsts, port = endpoints(objs, address)
        conns.extend(Connection(why, src, d, port) for d in dsts)

    # The submitter: what its own flags name (the model handler checks TF Serving).
    submitter = everything["Job/pipeline-submit"]
    argv = submitter_argv(objs)
    for f in ("job_endpoint", "artifact_endpoint", "flink_master", "tfserving_target"):
        to(submitter, value(argv, f), f"submitter --{f}")
    # The job's own work, in the TaskManagers' worker pool (their pod's network).
    redis = urlparse(value(argv, "redis_url"))
    to(taskmanager, f"{redis.hostname}:{redis.port or 6379}", "WriteToRedis --redis_url")
    to(taskmanager, value(argv, "tfserving_target"), "RunSentiment --tfserving_target")
    pool = container(objs, taskmanager.name, "beam-worker-pool")
    conns += _pubsub(objs, taskmanager, container_env(objs, pool), "PullFromPubSub")
    # Flink among its pods (the ports flink.yaml fixes), and its control plane.
    rpc, blob = int(conf["jobmanager.rpc.port"]), int(conf["blob.server.port"])
    conns += [Connection("TaskManager -> JobManager RPC", taskmanager, jobmanager, rpc),
              Connection("TaskManager -> blob server (job jars)", taskmanager, jobmanager, blob),
              Connection("JobManager -> TaskManager RPC", jobmanager, taskmanager,
                         int(conf["taskmanager.rpc.port"])),
              Connection("TaskManager -> TaskManager data exchange", taskmanager, taskmanager,
                         int(conf["taskmanager.data.port"]))]
    api, api_port = API_SERVER[name]
    conns.append(Connection("JobManager starts TaskManager pods", jobmanager, api, api_port))
    if conf.get("high-availability.type") == "kubernetes":
        conns.append(Connection("TaskManagers find the leader (Kubernetes HA)", taskmanager,
                                api, api_port))
    if any(str(v).startswith("gs://") for k, v in conf.items() if k.endswith("dir")):
        for pod in (jobmanager, taskmanager):
            conns += [Connection("checkpoints on GCS", pod, STORAGE, 443),
                      *(Connection("GCS credentials", pod, h, p) for h, p in METADATA)]
    conns.append(Connection("the operator polls the JobManager", OPERATOR, jobmanager,
                            int(conf["rest.port"])))
    # The job server submits to Flink's REST.
    jobserver = everything["Deployment/flink-jobserver"]
    js_argv = command_line(objs, container(objs, jobserver.name, "jobserver"))
    to(jobserver, value(js_argv, "flink-master"), "job server --flink-master")
    # The dashboard reads Redis and serves its page (through an Ingress, say).
    dashboard = everything["Deployment/dashboard"]
    dash_argv = command_line(objs, container(objs, dashboard.name, "dashboard"))
    dash_redis = urlparse(value(dash_argv, "redis_url"))
    to(dashboard, f"{dash_redis.hostname}:{dash_redis.port or 6379}", "dashboard --redis_url")
    conns.append(Connection("the dashboard's page", INGRESS_CONTROLLER, dashboard,
                            int(value(dash_argv, "port"))))
    # Whatever publishes to Pub/Sub or sets the emulator up.
    for where, _, spec in pod_specs(objs):
        for _, c in containers(spec):
            argv_c = command_line(objs, c)
            env = container_env(objs, c)
            if argv_c[:3] == ["python", "-m", "ingest"]:
                conns += _pubsub(objs, everything[where], env, f"{where} publishes")
                if "x-stream" in argv_c:
                    conns.append(Connection("the X filtered stream", everything[where], X_API,
                                            443))
            elif where.startswith("Job/pubsub-setup"):
                to(everything[where], env["PUBSUB_EMULATOR_HOST"], "creates topic and subscription")
    # Every pod resolves names.
    for pod in everything.values():
        conns += [Connection("DNS", pod, KUBE_DNS, 53, "UDP"),
                  Connection("DNS", pod, KUBE_DNS, 53, "TCP")]
    return conns


def forbidden_connections(name: str, objs: list[Obj]) -> list[Connection]:
    """Connections nothing needs: they must stay closed."""
    everything = pods(objs)
    _, jobmanager, taskmanager = _flink(objs)
    (redis,), _ = endpoints(objs, "redis:6379")
    (tfserving,), _ = endpoints(objs, "bertservice:8500")
    submitter = everything["Job/pipeline-submit"]
    dashboard = everything["Deployment/dashboard"]
    jobserver = everything["Deployment/flink-jobserver"]
    ingesters = [p for w, p in everything.items() if p.label_map.get(
        "app.kubernetes.io/name") == "ingester"]
    assert ingesters
    conns = [Connection("the submitter only hands --redis_url on", submitter, redis, 6379),
             Connection("the submitter reads no Pub/Sub", submitter, PUBSUB, 443),
             Connection("the built-in expansion service is not used", submitter, jobserver,
                        8097),
             Connection("the dashboard scores nothing", dashboard, tfserving, 8500),
             Connection("the dashboard talks to Redis only", dashboard, PUBSUB, 443),
             Connection("the dashboard has no business with Flink", dashboard, jobmanager, 8081),
             Connection("TF Serving calls nobody", tfserving, PUBSUB, 443),
             Connection("TF Serving calls nobody", tfserving, redis, 6379),
             Connection("Redis calls nobody", redis, ELSEWHERE, 443),
             Connection("the job server only submits", jobserver, PUBSUB, 443),
             Connection("the job server only submits", jobserver, taskmanager, 6122),
             Connection("the JobManager does not write results", jobmanager, redis, 6379),
             Connection("TaskManagers do not call the job server", taskmanager, jobserver, 8099),
             Connection("other namespaces", STRANGER, redis, 6379),
             Connection("other namespaces", STRANGER, tfserving, 8500),
             Connection("other namespaces", STRANGER, jobmanager, 8081),
             Connection("other namespaces", STRANGER, jobserver, 8099)]
    for ingester in ingesters:
        conns += [Connection("the ingester only publishes", ingester, redis, 6379),
                  Connection("the ingester only publishes", ingester, tfserving, 8500)]
    if name == "dev":
        (emulator,), port = endpoints(objs, "pubsub-emulator:8085")
        conns += [Connection("the dashboard reads no Pub/Sub", dashboard, emulator, port),
                  Connection("the submitter reads no Pub/Sub", submitter, emulator, port)]
    return conns


def _np(spec: Obj) -> Obj:
    return {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": NAMESPACE},
            "spec": spec}


def test_reachability_follows_kubernetes_semantics():
    """Control: the evaluator below means what Kubernetes means."""
    a, b = Pod("a", (("app", "a"),)), Pod("b", (("app", "b"),))
    a_elsewhere = Pod("a elsewhere", (("app", "a"),), "elsewhere")
    only_b = {"matchLabels": {"app": "b"}}
    assert reachable([], a, b, 80) is None, "no policy: open"
    deny = _np({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    assert reachable([deny], a, b, 80) and reachable([deny], a, PUBSUB, 443)
    ingress_only = _np({"podSelector": only_b, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 80}]}]})
    assert reachable([ingress_only], a, b, 80) is None
    assert reachable([ingress_only], a, b, 81), "another port"
    assert reachable([ingress_only], a_elsewhere, b, 80), "podSelector alone: own namespace"
    assert reachable([ingress_only], b, PUBSUB, 443) is None, "no Egress type: egress open"
    both = _np({"podSelector": only_b, "policyTypes": ["Ingress"], "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "elsewhere"}},
         "podSelector": {"matchLabels": {"app": "a"}}}]}]})
    assert reachable([both], a_elsewhere, b, 80) is None and reachable([both], a, b, 80)
    blocks = _np({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
         "ports": [{"port": 8000, "endPort": 8100}]}]})
    assert reachable([blocks], a, Host("h", "10.2.0.1"), 8080) is None
    assert reachable([blocks], a, Host("h", "10.1.0.1"), 8080), "except"
    assert reachable([blocks], a, Host("h", "10.2.0.1"), 8101), "endPort"
    assert reachable([blocks], a, b, 8080), "ipBlock selects no pod here"
    assert reachable([blocks], a, b, 8080, "UDP"), "ports default to TCP"
    nothing = _np({"podSelector": {}, "policyTypes": ["Egress"], "egress": []})
    assert reachable([nothing], a, b, 80), "egress: [] allows nothing"
    anywhere = _np({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]})
    assert reachable([nothing, anywhere], a, ELSEWHERE, 1) is None, "policies add up"
    named = _np({"podSelector": only_b, "ingress": [{"ports": [{"port": "web"}]}]})
    web = Pod("b", (("app", "b"),), ports=(("web", 8080),))
    assert reachable([named], a, web, 8080) is None and reachable([named], a, web, 8081)


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_connection_the_deployment_needs_is_allowed(name):
    objs = rendered(name)
    problems = []
    for c in required_connections(name, objs):
        why_not = reachable(objs, c.src, c.dst, c.port, c.protocol)
        if why_not:
            problems.append(f"{c.why}: {why_not}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", OVERLAYS)
def test_everything_else_stays_closed(name):
    objs = rendered(name)
    problems = [f"{c.why}: {c.src.name} -> {c.dst.name}:{c.port} is open"
                for c in forbidden_connections(name, objs)
                if reachable(objs, c.src, c.dst, c.port, c.protocol) is None]
    assert not problems, f"{name}:\n" + "\n".join(problems)


# --- 3. read-only root filesystems ------------------------------------------------------

# What a program writes besides what its flags name: temp files under /tmp (Python's
# tempfile and Beam's staging, the JVM's java.io.tmpdir, TF Serving's scratch) and its
# user's home (caches; gcloud's config). Names with $ are read from the container's env.
PROGRAM_WRITES = {
    "python": ["/tmp", "$HOME"],
    "java": ["/tmp", "$HOME"],
    "gcloud": ["/tmp", "$HOME", "$CLOUDSDK_CONFIG"],
    "tensorflow_model_server": ["/tmp"],
    "cp": [],  # its destination
    "sh": [],  # what its script redirects to, and a redis-server's dir
}
# Images whose entrypoint runs when the manifest gives no command.
IMAGE_PROGRAMS = {"bertstream/flink-jobserver": "java"}
# Flags whose value is a directory the program writes.
WRITING_FLAGS = ("--artifacts-dir", "--data-dir")
WRITABLE_VOLUMES = {"emptyDir", "persistentVolumeClaim", "ephemeral"}


def _mounted_text(objs: list[Obj], spec: Obj, c: Obj, path: str) -> str | None:
    """The content of a file a ConfigMap volume puts at ``path``."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            source = volumes.get(m["name"], {}).get("configMap")
            if source:
                key = path[len(m["mountPath"].rstrip("/")) + 1:]
                return one(objs, "ConfigMap", source["name"])["data"].get(key)
    return None


def _script_writes(objs: list[Obj], spec: Obj, c: Obj, argv: list[str]) -> set[str]:
    script = argv[2] if argv[1:2] == ["-c"] else _mounted_text(objs, spec, c, argv[1])
    assert script is not None, f"{c['name']}: cannot read the script {argv[1:]}"
    writes = {p for p in re.findall(r">\s*([^\s;|&<>]+)", script) if p != "/dev/null"}
    for conf_path in re.findall(r"redis-server\s+(\S+)", script):
        conf = _mounted_text(objs, spec, c, conf_path) or ""
        writes |= set(re.findall(r"^dir\s+(\S+)", conf, re.MULTILINE))
    return writes


def known_writes(objs: list[Obj], where: str, spec: Obj, c: Obj) -> dict[str, str]:
    """Path -> why the container writes there."""
    argv = command_line(objs, c)
    program = (Path(c["command"][0]).name if c.get("command")
               else IMAGE_PROGRAMS.get(c["image"].rsplit(":", 1)[0]))
    assert program in PROGRAM_WRITES, (
        f"{where}/{c['name']}: what does {program or c['image']} write? Add it to PROGRAM_WRITES")
    env = container_env(objs, c)
    writes = {}
    for path in PROGRAM_WRITES[program]:
        if path.startswith("$"):
            assert path[1:] in env, (
                f"{where}/{c['name']} runs {program} without {path[1:]}: it would default "
                "into the read-only image")
            writes[env[path[1:]]] = f"{program} ({path})"
        else:
            writes[path] = program
    writes |= {a.split("=", 1)[1]: a.split("=", 1)[0] for a in argv if a.startswith(WRITING_FLAGS)}
    if argv[:4] == ["python", "-m", "launcher", "flink"]:
        # Staging a setup file builds an sdist beside it, in the installed package.
        staged = [a.split("=", 1)[1] for a in FlinkLaunch.parse(argv[4:]).argv()
                  if a.startswith("--setup_file=")]
        writes |= {str(Path(f).parent): f"an sdist of {f} (staged)" for f in staged}
    if program == "cp":
        writes[argv[-1]] = "cp's destination"
    if program == "sh":
        writes |= dict.fromkeys(_script_writes(objs, spec, c, argv), "its script")
    return writes


def writable_mounts(objs: list[Obj], where: str, spec: Obj, c: Obj) -> list[str]:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    if where.startswith("StatefulSet/"):
        sts = one(objs, "StatefulSet", where.split("/")[1])
        volumes |= {t["metadata"]["name"]: {"persistentVolumeClaim": {}}
                    for t in sts["spec"].get("volumeClaimTemplates", [])}
    return [m["mountPath"] for m in c.get("volumeMounts", [])
            if not m.get("readOnly") and WRITABLE_VOLUMES & set(volumes.get(m["name"], {}))]


@pytest.mark.parametrize("name", OVERLAYS)
def test_what_each_container_writes_is_on_a_writable_volume(name):
    objs = rendered(name)
    problems, checked = [], 0
    for where, _, spec in pod_specs(objs):
        for _, c in containers(spec):
            if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                assert c["name"] in WRITABLE_ROOT, f"{where}/{c['name']}"
                continue
            mounts = writable_mounts(objs, where, spec, c)
            for path, why in sorted(known_writes(objs, where, spec, c).items()):
                checked += 1
                if not any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts):
                    problems.append(f"{where}/{c['name']} writes {path} ({why}) on the read-only "
                                    f"root (writable: {mounts})")
    assert checked >= 10, "the table of what programs write matched nothing"
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", OVERLAYS)
def test_submitter_stages_nothing(name):
    """Without --no_setup_file the launcher adds --setup_file=<its root>/setup.py, which
    an installed package does not have, and Beam would build an sdist from it."""
    argv = submitter_argv(rendered(name))
    assert "--no_setup_file" in argv
    staged = [a for a in FlinkLaunch.parse(argv).argv()
              if a.startswith(("--setup_file", "--requirements_file", "--extra_package"))]
    assert not staged, staged
    dockerfile = (K8S / "images" / "pipeline" / "Dockerfile").read_text()
    assert re.search(r"pip install [^\n]*-c constraints\.txt \.", dockerfile), (
        "the pipeline image must have the package installed")


# --- 4. the gke overlay on the cluster its README creates -------------------------------

# vCPUs and GiB of memory per machine type (Compute Engine's tables).
MACHINE_TYPES = {
    "e2-standard-4": (4, 16), "e2-standard-8": (8, 32), "e2-standard-16": (16, 64),
    "n2-standard-8": (8, 32), "n2-standard-16": (16, 64),
    "c3-standard-8": (8, 32), "c3-standard-22": (22, 88), "n4-standard-8": (8, 32),
}
# Left for GKE's own pods on every node: kube-dns, konnectivity-agent, fluentbit,
# gke-metrics-agent, anetd (Dataplane V2), pdcsi-node, metrics-server...
SYSTEM_PODS = (0.5, 1.0)
# kind: the control plane (API server, etcd, controller manager, scheduler) plus
# CoreDNS, kindnet and metrics-server share the one node with the workload.
KIND_SYSTEM = (1.0, 1.0)


def gke_allocatable(cpus: int, gib: float) -> tuple[float, float]:
    """What GKE leaves to pods on a node (its node-sizing formula)."""
    cpu_steps = [(1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025)]
    mem_steps = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02)]

    def reserved(total: float, steps: list[tuple[float, float]]) -> float:
        out = 0.0
        for size, share in steps:
            part = min(size, total)
            out, total = out + part * share, total - part
        return out

    eviction = 100 / 1024  # the kubelet's memory.available threshold, 100 MiB
    return cpus - reserved(cpus, cpu_steps), gib - reserved(gib, mem_steps) - eviction


@dataclass(frozen=True)
class Cluster:
    machine_type: str
    zones: int
    min_nodes: int
    max_nodes: int

    def node(self) -> tuple[float, float]:
        """CPU and GiB a node offers to this deployment's pods."""
        cpu, gib = gke_allocatable(*MACHINE_TYPES[self.machine_type])
        return cpu - SYSTEM_PODS[0], gib - SYSTEM_PODS[1]


def readme_cluster() -> Cluster:
    """The `gcloud container clusters create` of k8s/README.md, read as gcloud does:
    with --region the node pool is in 3 zones (or those --node-locations lists), and
    --num-nodes, --min-nodes, --max-nodes count per zone."""
    text = (K8S / "README.md").read_text()
    found = re.search(r"gcloud container clusters create (?:[^\n]*\\\n)*[^\n]*", text)
    assert found, "k8s/README.md creates no GKE cluster"
    tokens = shlex.split(found.group(0).replace("\\\n", " "))
    flags: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            if "=" in token:
                key, val = token[2:].split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                key, val = token[2:], tokens[i + 1]
                i += 1
            else:
                key, val = token[2:], True
            flags[key] = val
        i += 1
    machine = flags.get("machine-type", "e2-medium")
    assert machine in MACHINE_TYPES, f"add {machine} to MACHINE_TYPES"
    if "node-locations" in flags:
        zones = len(flags["node-locations"].split(","))
    else:
        zones = 3 if "region" in flags else 1
    nodes = int(flags.get("num-nodes", 3)) * zones
    if flags.get("enable-autoscaling"):
        if "total-min-nodes" in flags:
            low, high = int(flags["total-min-nodes"]), int(flags["total-max-nodes"])
        else:
            low = int(flags.get("min-nodes", 0)) * zones
            high = int(flags["max-nodes"]) * zones
        return Cluster(machine, zones, max(low, min(nodes, high)), high)
    return Cluster(machine, zones, nodes, nodes)


def cpu_quantity(q: Any) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def gib_quantity(q: Any) -> float:
    """A Kubernetes memory quantity in GiB."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, q
    number, unit = float(m.group(1)), m.group(2)
    return number * (_BINARY.get(unit) or _DECIMAL.get(unit) or 1) / 2**30


def flink_gib(q: str) -> float:
    """A Flink memory size (``1600m``, ``2g``: binary units) in GiB."""
    m = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)b?", str(q).lower())
    assert m, q
    return float(m.group(1)) * {"": 2**-30, "k": 2**-20, "m": 2**-10, "g": 1, "t": 2**10}[
        m.group(2)]


def pod_request(objs: list[Obj], where: str, spec: Obj) -> tuple[float, float]:
    """CPU and GiB the scheduler reserves for one pod: its containers' requests added up,
    or its largest init container's, whichever is more."""

    def request(c: Obj) -> tuple[float, float]:
        resource = flink_resource(objs, where) if c["name"] == "flink-main-container" else None
        if resource is not None:  # the operator requests spec.<role>.resource
            return float(resource["cpu"]), flink_gib(resource["memory"])
        res = c.get("resources", {})
        asked = {**res.get("limits", {}), **res.get("requests", {})}
        return cpu_quantity(asked.get("cpu", 0)), gib_quantity(asked.get("memory", 0))

    main = [request(c) for c in spec.get("containers", [])]
    init = [request(c) for c in spec.get("initContainers", [])]
    return tuple(max(sum(r[i] for r in main), max((r[i] for r in init), default=0.0))
                 for i in (0, 1))


@dataclass(frozen=True)
class Workload:
    where: str
    request: tuple[float, float]
    at_rest: int  # pods with the HorizontalPodAutoscalers at their minimum
    at_peak: int  # ... at their maximum
    surge: int  # extra pods while it rolls out


def workloads(objs: list[Obj]) -> list[Workload]:
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]
            for h in by_kind(objs, "HorizontalPodAutoscaler")}
    parallelism = int(value(submitter_argv(objs), "parallelism"))
    out = []
    for where, _, spec in pod_specs(objs):
        kind, name = where.split("/")[:2]
        surge = 0
        if kind == "FlinkDeployment":
            flink = one(objs, kind, name)["spec"]
            if where.endswith("/jobManager"):
                rest = peak = flink["jobManager"].get("replicas", 1)
            else:  # the JobManager starts ceil(parallelism / slots) TaskManagers
                slots = int(flink["flinkConfiguration"]["taskmanager.numberOfTaskSlots"])
                rest = peak = math.ceil(parallelism / slots)
        elif kind == "Job":
            rest = peak = one(objs, kind, name)["spec"].get("parallelism", 1)
        else:
            o = one(objs, kind, name)["spec"]
            if name in hpas:
                rest, peak = hpas[name].get("minReplicas", 1), hpas[name]["maxReplicas"]
            else:
                rest = peak = o.get("replicas", 1)
            strategy = o.get("strategy", {})
            if kind == "Deployment" and strategy.get("type", "RollingUpdate") == "RollingUpdate":
                max_surge = str(strategy.get("rollingUpdate", {}).get("maxSurge", "25%"))
                surge = (math.ceil(peak * int(max_surge[:-1]) / 100)
                         if max_surge.endswith("%") else int(max_surge))
        out.append(Workload(where, pod_request(objs, where, spec), rest, peak, surge))
    return out


def first_fit_decreasing(pod_list: list[tuple[str, float, float]], nodes: int,
                         node: tuple[float, float]) -> list[str]:
    """The pods that find no node (biggest first, each on the first node with room)."""
    free = [list(node) for _ in range(nodes)]
    unplaced = []
    for name, cpu, gib in sorted(pod_list, key=lambda p: (p[1], p[2]), reverse=True):
        for room in free:
            if cpu <= room[0] + 1e-9 and gib <= room[1] + 1e-9:
                room[0] -= cpu
                room[1] -= gib
                break
        else:
            unplaced.append(f"{name} ({cpu:g} CPU, {gib:.2f} GiB)")
    return unplaced


def pods_of(loads: list[Workload], state: str) -> list[tuple[str, float, float]]:
    """Every pod in ``state`` (at_rest, at_peak), plus the largest single rollout's
    surge (one rollout at a time)."""
    out = [(f"{w.where}#{i}", *w.request) for w in loads for i in range(getattr(w, state))]
    rolling = max((w for w in loads if w.surge), key=lambda w: w.request[0] * w.surge,
                  default=None)
    if rolling:
        out += [(f"{rolling.where}#surge{i}", *rolling.request) for i in range(rolling.surge)]
    return out


def totals(loads: list[Workload], state: str = "at_rest") -> tuple[float, float]:
    return (sum(w.request[0] * getattr(w, state) for w in loads),
            sum(w.request[1] * getattr(w, state) for w in loads))


def test_readme_cluster_reading():
    """Control: the README's cluster as gcloud would create it."""
    cluster = readme_cluster()
    assert cluster.zones == 3, "a --region cluster spreads its node pool over 3 zones"
    cpu, gib = gke_allocatable(8, 32)
    assert round(cpu, 2) == 7.91 and 28 < gib < 28.6, (cpu, gib)
    assert first_fit_decreasing([("a", 3, 1), ("b", 3, 1), ("c", 3, 1)], 2, (5, 8)) == [
        "c (3 CPU, 1.00 GiB)"]


@pytest.mark.parametrize("state,nodes", [("at_rest", "min_nodes"), ("at_peak", "max_nodes")])
def test_gke_overlay_fits_the_readme_cluster(state, nodes):
    """At rest (the autoscalers at their minimum) on the cluster's first nodes, and at
    peak (TF Serving's HPA at its maximum) on as many nodes as the cluster autoscaler
    may add; both while one Deployment rolls out."""
    cluster = readme_cluster()
    count = getattr(cluster, nodes)
    node = cluster.node()
    loads = workloads(rendered("gke"))
    pod_list = pods_of(loads, state)
    too_big = [p for p in pod_list if p[1] > node[0] or p[2] > node[1]]
    assert not too_big, f"no {cluster.machine_type} node can hold {too_big} (a node: {node})"
    unplaced = first_fit_decreasing(pod_list, count, node)
    asked = (sum(p[1] for p in pod_list), sum(p[2] for p in pod_list))
    assert not unplaced, (
        f"gke {state}: {asked[0]:g} CPU and {asked[1]:.1f} GiB asked of {count} x "
        f"{cluster.machine_type} ({node[0]:.2f} CPU, {node[1]:.1f} GiB each after GKE's "
        f"reservations and system pods); left without a node: {unplaced}")


def _readme_claim(pattern: str) -> tuple[float, float]:
    found = re.search(pattern, " ".join((K8S / "README.md").read_text().split()))
    assert found, f"k8s/README.md no longer says {pattern!r}"
    return float(found.group(1)), float(found.group(2))


def _about(stated: float, actual: float) -> bool:
    return abs(stated - actual) <= max(0.5, 0.1 * actual)


@pytest.mark.parametrize("name", OVERLAYS)
def test_readme_states_what_each_overlay_requests(name):
    cpu, gib = totals(workloads(rendered(name)))
    stated = _readme_claim(rf"the {name} overlay requests about ([0-9.]+) CPUs and ([0-9.]+) GiB")
    assert _about(stated[0], cpu) and _about(stated[1], gib), (
        f"k8s/README.md says {name} requests about {stated}; it requests {cpu:.2f} CPU and "
        f"{gib:.2f} GiB")


def test_dev_overlay_fits_the_docker_the_readme_asks_for():
    cpus, gib = _readme_claim(r"Give Docker at least ([0-9]+) CPUs and ([0-9]+) GiB")
    node = (cpus - KIND_SYSTEM[0], gib - KIND_SYSTEM[1])
    unplaced = first_fit_decreasing(pods_of(workloads(rendered("dev")), "at_rest"), 1, node)
    assert not unplaced, f"kind's one node ({node}) cannot hold {unplaced}"


# --- 5. the model on TF Serving's TensorFlow ----------------------------------------------

SERVING_IMAGE = "tensorflow/serving:2.19.1"
# What that image runs: TensorFlow 2.19.1 (tensorflow/serving's WORKSPACE at tag 2.19.1
# pins TF's v2.19.1 commit) with the ops of tensorflow-text 2.12.1 linked in
# (tensorflow_serving/workspace.bzl: org_tensorflow_text v2.12.1). PyPI has no
# tensorflow-text 2.12 for TF 2.19, so the venv pairs TF 2.19.1 with tensorflow-text
# 2.19.0, and the text ops the model uses are held to 2.12.1's signatures below.
SERVING_TF = "2.19.1"
SERVING_TF_TEXT_PYPI = "2.19.0"
SERVING_VENV = cache_dir() / "venvs" / "tf-serving-2.19"
# tensorflow-text v2.12.1's registrations (tensorflow_text/core/ops/*.cc and
# core/kernels/*_kernel_template.h) of the ops a WordPiece tokenizer graph uses:
# inputs, outputs, attribute names.
TF_TEXT_2_12_1_OPS = {
    "CaseFoldUTF8": (["input: string"], ["output: string"], []),
    "NormalizeUTF8": (["input: string"], ["output: string"], ["normalization_form"]),
    "RegexSplitWithOffsets": (
        ["input: string", "delim_regex_pattern: string", "keep_delim_regex_pattern: string"],
        ["tokens: string", "begin_offsets: int64", "end_offsets: int64", "row_splits: int64"],
        []),
    "FastWordpieceTokenizeWithOffsets": (
        ["input_values: string", "wp_model: uint8"],
        ["output_subwords: string", "output_ids: int64", "output_row_splits: int64",
         "start_values: int64", "end_values: int64"], []),
    "WordpieceTokenizeWithOffsets": (
        ["input_values: string", "vocab_lookup_table: resource"],
        ["output_values: string", "output_row_lengths: int64", "start_values: int64",
         "limit_values: int64"],
        ["max_bytes_per_word", "max_chars_per_token", "output_row_partition_type",
         "split_unknown_characters", "suffix_indicator", "unknown_token", "use_unknown_token"]),
}

# Run by both interpreters: the ops the model uses beyond core TensorFlow (with their
# signatures as this tensorflow-text registers them), then the labels of the texts.
_SCORE = r"""
import json, sys
from pathlib import Path
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

version_dir, texts = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
model = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
used = {}
for meta in model.meta_graphs:
    nodes = list(meta.graph_def.node)
    nodes += [n for f in meta.graph_def.library.function for n in f.node_def]
    for node in nodes:
        used.setdefault(node.op, set()).update(a for a in node.attr if not a.startswith("_"))
extra = sorted(op for op in used if op_def_registry.get(op) is None)
import tensorflow_text  # registers its ops, as the model server links them in

def arg(a):
    return f"{a.name}: {tf.dtypes.as_dtype(a.type).name if a.type else a.type_attr}"

ops = {}
for op in extra:
    d = op_def_registry.get(op)
    ops[op] = d and {"inputs": [arg(a) for a in d.input_arg],
                     "outputs": [arg(a) for a in d.output_arg],
                     "attrs": sorted(a.name for a in d.attr), "node_attrs": sorted(used[op])}
out = tf.saved_model.load(str(version_dir)).signatures["serving_default"](text=tf.constant(texts))
print(json.dumps({"tensorflow": tf.__version__, "tensorflow_text": tensorflow_text.__version__,
                  "ops": ops, "class_id": out["class_id"].numpy().tolist(),
                  "probabilities": out["probabilities"].numpy().tolist()}))
"""


def _texts() -> list[str]:
    texts = []
    for line in (ROOT / "pipeline" / "data" / "sample_tweets.jsonl").read_bytes().splitlines():
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            continue  # the sample's deliberately bad lines
    edge = ["", "   ", "😀😀😀 🔥", "まじで最高の一日だった", "@someone https://t.co/x ok",
            "terrible " * 200, "ÅNGSTRÖM café naïve", "!!!???", "12345"]
    return texts[:40] + edge


def _score(python: str, version_dir: Path, texts_file: Path) -> dict:
    proc = subprocess.run([python, "-c", _SCORE, str(version_dir), str(texts_file)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{python} could not load {version_dir}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def serving_python() -> str:
    python = SERVING_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no TF Serving venv at {SERVING_VENV}: run `make tf-serving-venv` "
                    f"(TensorFlow {SERVING_TF}, tensorflow-text {SERVING_TF_TEXT_PYPI}; once)")
    return str(python)


def test_serving_venv_matches_the_served_image():
    for name in OVERLAYS:
        server = container(rendered(name), "Deployment/tfserving", "tfserving")
        assert server["image"] == SERVING_IMAGE, (
            f"{name} serves {server['image']}: bring SERVING_* and `make tf-serving-venv` "
            "to the TensorFlow it ships")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", ["tiny", "default"])
def test_served_tensorflow_loads_the_export_with_the_same_labels(
        model, serving_python, request, tmp_path):
    """The tiny test model, and the default model (a fused bfloat16 graph) when built."""
    from model.serving import resolve

    if model == "tiny":
        version_dir = resolve(request.getfixturevalue("tiny_model_dir"))
    else:
        default = ROOT / "models" / "bert_sentiment"
        if not any(default.glob("*/saved_model.pb")):
            pytest.skip(f"{default} is not built (`make model`)")
        version_dir = resolve(default)
    texts_file = tmp_path / "texts.json"
    texts = _texts()
    texts_file.write_text(json.dumps(texts))
    served = _score(serving_python, version_dir, texts_file)
    assert (served["tensorflow"], served["tensorflow_text"]) == (
        SERVING_TF, SERVING_TF_TEXT_PYPI), served
    for op, signature in served["ops"].items():
        assert op in TF_TEXT_2_12_1_OPS, (
            f"{version_dir} uses {op}, which is not core TensorFlow: check that "
            "tensorflow-text 2.12.1 (linked into the model server) has it, then add it "
            "to TF_TEXT_2_12_1_OPS")
        inputs, outputs, attrs = TF_TEXT_2_12_1_OPS[op]
        assert signature, f"{op} is not registered by tensorflow-text {SERVING_TF_TEXT_PYPI}"
        assert (signature["inputs"], signature["outputs"]) == (inputs, outputs), (op, signature)
        assert set(signature["node_attrs"]) <= set(attrs), (op, signature)
    ours = _score(sys.executable, version_dir, texts_file)
    differ = [(t[:40], a, b) for t, a, b in zip(texts, ours["class_id"], served["class_id"])
              if a != b]
    drift = max(abs(x - y) for p, q in zip(ours["probabilities"], served["probabilities"])
                for x, y in zip(p, q))
    assert not differ, (
        f"{version_dir}: TensorFlow {served['tensorflow']} labels {len(differ)} of "
        f"{len(texts)} texts unlike TensorFlow {ours['tensorflow']}: {differ[:5]} "
        f"(largest probability difference {drift:.4f})")
    assert drift < 0.02, f"{version_dir}: probabilities differ by up to {drift:.4f}"
