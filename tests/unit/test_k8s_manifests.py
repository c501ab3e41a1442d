"""Offline validation of `deploy/k8s`: a minimal kustomize renderer, the Kubernetes 1.31 JSON
schemas (kubernetes-validate) and the invariants the deployment promises.

No kubectl, kustomize or cluster is needed. The renderer implements exactly the kustomize
subset the overlays use, and fails loudly on anything else:

- `resources`: YAML files (one or more documents) or directories holding a kustomization;
- `namespace`: set on every namespaced object;
- `patches` with only `path`, each file ONE strategic-merge document whose apiVersion, kind
  and metadata.name pick the target. Semantics: maps merge recursively; `null` deletes a key;
  lists merge by the patchMergeKey Kubernetes declares for them (containers, initContainers,
  env, volumes by `name`; volumeMounts by `mountPath`), where an item `$patch: delete`
  removes the match; every other list is replaced whole (kustomize does the same for lists
  without a merge key such as tolerations, and for custom resources such as ScaledObject);
  a top-level `$patch: delete` removes the object;
- `images` (`name` -> `newName` / `newTag` / `digest`) on pod-template containers.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from voicejury_contracts import Stage, Topology

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
TARGETS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "production": K8S / "overlays" / "production",
}
K8S_VERSION = "1.31"

STAGES = ("separator", "pitch", "asr", "scorer", "jury")
GPU_STAGES = frozenset({"separator", "pitch", "asr"})
SERVICES = ("gateway", *STAGES)
PLACEHOLDER = "REPLACE_ME"

Obj = dict[str, Any]

# --------------------------------------------------------------------------- renderer

MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
CLUSTER_SCOPED = frozenset({"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"})
KUSTOMIZATION_FIELDS = frozenset(
    {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
)


def _is_builtin(obj: Obj) -> bool:
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def strategic_merge(target: Any, patch: Any, *, builtin: bool = True) -> Any:
    """Returns `target` with `patch` applied (see the module docstring for the semantics)."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if key == "$patch":
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value, builtin=builtin)
        elif builtin and key in MERGE_KEYS and isinstance(value, list) and key in out:
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key], builtin=builtin)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(items: list[Any], patches: list[Any], key: str, *, builtin: bool) -> list[Any]:
    out = copy.deepcopy(items)
    for patch in patches:
        assert isinstance(patch, dict), f"list item of {key}-keyed list is not a mapping"
        assert key in patch, f"list item without merge key {key}"
        index = next((i for i, item in enumerate(out) if item.get(key) == patch[key]), None)
        if patch.get("$patch") == "delete":
            assert index is not None, f"$patch: delete of a missing item {patch[key]}"
            del out[index]
        elif index is None:
            out.append({k: v for k, v in patch.items() if k != "$patch"})
        else:
            out[index] = strategic_merge(out[index], patch, builtin=builtin)
    return out


def _load_yaml_documents(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    return docs


def _ident(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _set_image(image: str, rules: list[Obj]) -> str:
    name, _, tag = image.partition("@")[0].rpartition(":") if ":" in image else (image, "", "")
    for rule in rules:
        if rule["name"] == name:
            new_name = rule.get("newName", name)
            if "digest" in rule:
                return f"{new_name}@{rule['digest']}"
            return f"{new_name}:{rule.get('newTag', tag)}" if rule.get("newTag", tag) else new_name
    return image


def render(directory: Path) -> list[Obj]:
    """`kustomize build directory`, for the subset described above."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: renderer does not support {sorted(unknown)}"
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else _load_yaml_documents(path)
    for spec in kustomization.get("patches", []):
        assert set(spec) == {"path"}, f"{directory}: only `patches: - path:` is supported"
        (patch,) = _load_yaml_documents(directory / spec["path"])  # one document per file
        matches = [
            i
            for i, o in enumerate(objects)
            if _ident(o) == _ident(patch) and o["apiVersion"] == patch["apiVersion"]
        ]
        assert len(matches) == 1, f"{spec['path']}: patch target {_ident(patch)} not found"
        if patch.get("$patch") == "delete":
            del objects[matches[0]]
        else:
            target = objects[matches[0]]
            objects[matches[0]] = strategic_merge(target, patch, builtin=_is_builtin(target))
    if rules := kustomization.get("images"):
        for obj in objects:
            for container in _pod_containers(obj, init=True):
                container["image"] = _set_image(container["image"], rules)
    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    seen = [(o["apiVersion"], *_ident(o)) for o in objects]
    assert len(seen) == len(set(seen)), f"{directory}: duplicate objects"
    return objects


@functools.cache
def _rendered(target: str) -> str:
    return json.dumps(render(TARGETS[target]))


def rendered(target: str) -> list[Obj]:
    """A fresh copy of the rendered target (rendering happens once per target)."""
    objects: list[Obj] = json.loads(_rendered(target))
    return objects


# --------------------------------------------------------------------------- helpers


def _pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        spec: Obj = obj["spec"]["template"]["spec"]
        return spec
    return None


def _pod_containers(obj: Obj, *, init: bool = False) -> Iterator[Obj]:
    spec = _pod_spec(obj)
    if spec is None:
        return
    yield from spec["containers"]
    if init:
        yield from spec.get("initContainers", [])


def of_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def effective_env(container: Obj, objects: list[Obj]) -> dict[str, str | None]:
    """The container's environment as the kubelet builds it: envFrom in order, then env.

    Values from Secrets are returned as None (their presence is what matters here)."""
    config_maps = of_kind(objects, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        else:
            secret = of_kind(objects, "Secret")[source["secretRef"]["name"]]
            env.update(dict.fromkeys(secret.get("stringData", {})))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in (ref := var["valueFrom"]):
            env[var["name"]] = config_maps[ref["configMapKeyRef"]["name"]]["data"][
                ref["configMapKeyRef"]["key"]
            ]
        else:
            env[var["name"]] = None
    return env


def _deployment(objects: list[Obj], name: str) -> Obj:
    return of_kind(objects, "Deployment")[name]


def _main_container(deployment: Obj) -> Obj:
    containers: list[Obj] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    assert container["name"] == deployment["metadata"]["name"]
    return container


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(objects: list[Obj]) -> list[dict[str, str]]:
    return [
        o["spec"]["template"]["metadata"]["labels"] for o in objects if _pod_spec(o) is not None
    ]


# --------------------------------------------------------------------------- renderer tests


def test_strategic_merge_semantics() -> None:
    target = {
        "spec": {
            "tolerations": [{"key": "a"}],
            "nodeSelector": {"pool": "gpu"},
            "containers": [
                {
                    "name": "c",
                    "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                    "resources": {"limits": {"cpu": "1", "nvidia.com/gpu": 1}},
                }
            ],
        }
    }
    patch = {
        "spec": {
            "tolerations": [{"key": "b"}],
            "nodeSelector": None,
            "containers": [
                {
                    "name": "c",
                    "env": [{"name": "A", "value": "9"}, {"name": "B", "$patch": "delete"}],
                    "resources": {"limits": {"nvidia.com/gpu": None}},
                },
                {"name": "d"},
            ],
        }
    }
    assert strategic_merge(target, patch) == {
        "spec": {
            "tolerations": [{"key": "b"}],
            "containers": [
                {
                    "name": "c",
                    "env": [{"name": "A", "value": "9"}],
                    "resources": {"limits": {"cpu": "1"}},
                },
                {"name": "d"},
            ],
        }
    }
    # Custom resources: JSON-merge-patch semantics, lists are replaced.
    assert strategic_merge({"env": [{"name": "A"}]}, {"env": [{"name": "B"}]}, builtin=False) == {
        "env": [{"name": "B"}]
    }


def test_image_rules() -> None:
    rules = [{"name": "voicejury/gateway", "newName": "reg.io/vj/gateway", "newTag": "1.2"}]
    assert _set_image("voicejury/gateway:0.1.0", rules) == "reg.io/vj/gateway:1.2"
    assert _set_image("voicejury/pitch:0.1.0", rules) == "voicejury/pitch:0.1.0"
    assert _set_image("nats:2.10", [{"name": "nats", "digest": "sha256:ab"}]) == "nats@sha256:ab"


# --------------------------------------------------------------------------- schemas


@functools.cache
def _validate_builtin(serialized: str) -> None:
    obj = json.loads(serialized)
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # the schema dump is huge: keep it short
        path = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


def _check_scaled_object(obj: Obj) -> None:
    """KEDA ScaledObject (keda.sh/v1alpha1): no schema ships with kubernetes-validate."""
    name = obj["metadata"]["name"]
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, name
    spec = obj["spec"]
    allowed = {
        "scaleTargetRef",
        "pollingInterval",
        "cooldownPeriod",
        "initialCooldownPeriod",
        "idleReplicaCount",
        "minReplicaCount",
        "maxReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    }
    assert set(spec) <= allowed, f"{name}: unknown fields {set(spec) - allowed}"
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec.get(field), int), f"{name}.{field}"
        assert spec[field] >= 0, f"{name}.{field}"
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"], name
    if fallback := spec.get("fallback"):
        assert set(fallback) == {"failureThreshold", "replicas"}, name
        assert all(isinstance(v, int) and v > 0 for v in fallback.values()), name
    if advanced := spec.get("advanced"):
        assert set(advanced) <= {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount"}
    assert spec["triggers"], name
    for trigger in spec["triggers"]:
        assert set(trigger) <= {"type", "metadata", "name", "authenticationRef", "metricType"}
        assert trigger["type"] == "nats-jetstream", name
        meta = trigger["metadata"]
        required = {"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"}
        optional = {"activationLagThreshold", "useHttps"}
        assert required <= set(meta) <= required | optional, f"{name}: {sorted(meta)}"
        assert all(isinstance(v, str) for v in meta.values()), (
            f"{name}: metadata values are strings"
        )
        assert int(meta["lagThreshold"]) > 0
        assert int(meta.get("activationLagThreshold", "0")) >= 0
        assert meta.get("useHttps", "false") in ("true", "false")


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_object_is_valid(target: str) -> None:
    objects = rendered(target)
    assert objects
    for obj in objects:
        assert obj["metadata"].get("namespace", "voicejury") == "voicejury"
        if obj["apiVersion"].startswith("keda.sh/"):
            assert obj["kind"] == "ScaledObject"
            _check_scaled_object(obj)
        else:
            _validate_builtin(json.dumps(obj, sort_keys=True))


# --------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("target", list(TARGETS))
def test_workloads_are_hardened(target: str) -> None:
    objects = rendered(target)
    assert set(of_kind(objects, "Deployment")) == set(SERVICES)
    for obj in objects:
        pod = _pod_spec(obj)
        if pod is None:
            continue
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in _pod_containers(obj, init=True):
            where = f"{name}:{container['name']}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where} {kind}"
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if obj["kind"] in ("Deployment", "Job"):
                assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be an emptyDir"
            if obj["kind"] != "Job":
                assert "readinessProbe" in container, where
                assert "livenessProbe" in container, where


@pytest.mark.parametrize("target", list(TARGETS))
def test_service_commands_and_probes(target: str) -> None:
    objects = rendered(target)
    for service in SERVICES:
        deployment = _deployment(objects, service)
        container = _main_container(deployment)
        expected = ["python", "-m", f"voicejury_{service}"]
        expected += ["serve"] if service == "gateway" else []
        assert container["command"] == expected
        assert "args" not in container
        port = 8000 if service == "gateway" else 8081
        env = effective_env(container, objects)
        ports = [{"name": "http", "containerPort": port}]
        metrics_port = port
        if service == "gateway":
            # Apart from the API, so that what routes the API cannot expose the metrics.
            metrics_port = int(env["VJ_GATEWAY_METRICS_PORT"] or 0)
            assert metrics_port not in (0, port)
            ports.append({"name": "metrics", "containerPort": metrics_port})
        assert container["ports"] == ports
        assert env["VJ_HTTP_PORT"] == str(port)
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics_port)
        assert annotations["prometheus.io/path"] == "/metrics"
        assert container["image"].rpartition(":")[0].endswith(f"voicejury/{service}")
        # The scaler (KEDA or the HPA) owns the replica count; `replicas` would fight it.
        assert "replicas" not in deployment["spec"]
    (migrate,) = _pod_containers(of_kind(objects, "Job")["gateway-migrate"])
    assert migrate["command"] == ["python", "-m", "voicejury_gateway", "migrate"]


@pytest.mark.parametrize("target", list(TARGETS))
def test_stage_grace_period_covers_ack_wait(target: str) -> None:
    objects = rendered(target)
    for stage in STAGES:
        deployment = _deployment(objects, stage)
        env = effective_env(_main_container(deployment), objects)
        ack_wait = float(env["VJ_ACK_WAIT_S"] or "nan")
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= ack_wait, f"{stage}: grace {grace}s < ack wait {ack_wait}s"
        assert ack_wait >= 3 * float(env["VJ_HEARTBEAT_S"] or "nan"), stage
        assert int(env["VJ_MAX_DELIVER"] or 0) >= 1
        assert int(env["VJ_CONCURRENCY"] or 0) >= 1


def _gpu_scheduled(deployment: Obj) -> tuple[bool, bool, bool]:
    pod = deployment["spec"]["template"]["spec"]
    limits = _main_container(deployment)["resources"]["limits"]
    requests_gpu = limits.get("nvidia.com/gpu") == 1
    tolerates = any(
        t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
        for t in pod.get("tolerations", [])
    )
    on_gpu_pool = pod.get("nodeSelector", {}).get("voicejury.dev/pool") == "gpu"
    return requests_gpu, tolerates, on_gpu_pool


@pytest.mark.parametrize("target", ["base", "production"])
def test_gpu_stages_on_gpu_pool(target: str) -> None:
    objects = rendered(target)
    for service in SERVICES:
        flags = _gpu_scheduled(_deployment(objects, service))
        if service in GPU_STAGES:
            assert flags == (True, True, True), f"{service}: gpu limit, toleration, pool"
        else:
            assert flags == (False, False, False), f"{service} must stay off the GPU pool"
    separator = effective_env(_main_container(_deployment(objects, "separator")), objects)
    assert separator["VJ_SEPARATOR_DEVICE"] == "cuda"


def test_dev_is_cpu_only() -> None:
    objects = rendered("dev")
    text = json.dumps(objects)
    assert "nvidia.com/gpu" not in text
    assert '"gpu"' not in text  # no GPU pool selector or affinity anywhere
    for stage, setting in (
        ("separator", "VJ_SEPARATOR_DEVICE"),
        ("pitch", "VJ_PITCH_DEVICE"),
        ("asr", "VJ_ASR_DEVICE"),
    ):
        assert (
            effective_env(_main_container(_deployment(objects, stage)), objects)[setting] == "cpu"
        )
    assert of_kind(objects, "HorizontalPodAutoscaler")["gateway"]["spec"]["maxReplicas"] == 1


def _cpu_millis(quantity: str) -> float:
    return float(quantity[:-1]) if quantity.endswith("m") else float(quantity) * 1000


def test_dev_is_smaller_than_production() -> None:
    dev, prod = rendered("dev"), rendered("production")
    for service in SERVICES:
        small = _main_container(_deployment(dev, service))["resources"]["requests"]["cpu"]
        large = _main_container(_deployment(prod, service))["resources"]["requests"]["cpu"]
        assert _cpu_millis(small) <= _cpu_millis(large), service


# --------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("target", ["base", "production"])
def test_each_stage_scales_on_its_own_consumer(target: str) -> None:
    objects = rendered(target)
    namespace = of_kind(objects, "ConfigMap")["voicejury-common"]["data"]["VJ_NAMESPACE"]
    topology = Topology(namespace)
    scaled = of_kind(objects, "ScaledObject")
    assert set(scaled) == set(STAGES)
    services = of_kind(objects, "Service")
    for stage in STAGES:
        spec = scaled[stage]["spec"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": stage,
        }
        assert spec["fallback"]["replicas"] >= 1
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert meta["consumer"] == topology.consumer(Stage(stage)).durable == f"vj-{stage}"
        assert meta["stream"] == topology.stream.name == "VJ_JOBS"
        assert meta["account"] == "$G"
        host, _, port = meta["natsServerMonitoringEndpoint"].partition(":")
        service, _, rest = host.partition(".")
        assert rest == "voicejury.svc.cluster.local", host
        assert port == "8222"
        assert any(p["port"] == 8222 for p in services[service]["spec"]["ports"])
    hpa = of_kind(objects, "HorizontalPodAutoscaler")
    assert set(hpa) == {"gateway"}
    (metric,) = hpa["gateway"]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 1 <= hpa["gateway"]["spec"]["minReplicas"] <= hpa["gateway"]["spec"]["maxReplicas"]


def test_production_keeps_every_stage_warm() -> None:
    for stage, obj in of_kind(rendered("production"), "ScaledObject").items():
        assert obj["spec"]["minReplicaCount"] >= 1, stage
    assert (
        of_kind(rendered("production"), "HorizontalPodAutoscaler")["gateway"]["spec"]["minReplicas"]
        >= 2
    )


def test_dev_needs_no_keda() -> None:
    assert not of_kind(rendered("dev"), "ScaledObject")


@pytest.mark.parametrize(("target", "replicas"), [("base", 1), ("dev", 1), ("production", 3)])
def test_stream_replicas_fit_the_nats_cluster(target: str, replicas: int) -> None:
    objects = rendered(target)
    assert of_kind(objects, "ConfigMap")["voicejury-common"]["data"]["VJ_STREAM_REPLICAS"] == str(
        replicas
    )
    nats = of_kind(objects, "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == replicas
    conf = of_kind(objects, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "jetstream" in conf
    assert "store_dir: /data" in conf
    assert "http: 0.0.0.0:8222" in conf
    assert ("cluster {" in conf) == (replicas > 1)
    routes = re.findall(r"nats://(nats-\d)\.nats-headless\.voicejury\.svc", conf)
    assert routes == [f"nats-{i}" for i in range(replicas)] if replicas > 1 else not routes
    assert nats["spec"]["serviceName"] == "nats-headless"
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"


# --------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("target", list(TARGETS))
def test_references_resolve(target: str) -> None:
    objects = rendered(target)
    config_maps, secrets = of_kind(objects, "ConfigMap"), of_kind(objects, "Secret")
    claims = of_kind(objects, "PersistentVolumeClaim")
    for obj in objects:
        pod = _pod_spec(obj)
        if pod is None:
            continue
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        templates = {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])}
        for container in _pod_containers(obj, init=True):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in {v["name"] for v in pod.get("volumes", [])} | templates
            for source in container.get("envFrom", []):
                assert source.get("configMapRef", {}).get("name", next(iter(config_maps))) in (
                    config_maps
                )
            for var in container.get("env", []):
                ref = var.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    data = secrets[ref["secretKeyRef"]["name"]]["stringData"]
                    assert ref["secretKeyRef"]["key"] in data, var["name"]
                if "configMapKeyRef" in ref:
                    data = config_maps[ref["configMapKeyRef"]["name"]]["data"]
                    assert ref["configMapKeyRef"]["key"] in data, var["name"]
    labels = _pod_labels(objects)
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in of_kind(objects, kind).items():
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(_selects(selector, pod) for pod in labels), f"{kind}/{name} selects nothing"
    for workload in (
        *of_kind(objects, "Deployment").values(),
        *of_kind(objects, "StatefulSet").values(),
    ):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert _selects(selector, workload["spec"]["template"]["metadata"]["labels"])
    for obj in (
        *of_kind(objects, "HorizontalPodAutoscaler").values(),
        *of_kind(objects, "ScaledObject").values(),
    ):
        assert obj["spec"]["scaleTargetRef"]["name"] in of_kind(objects, "Deployment")


# --------------------------------------------------------------------------- network flows
#
# A model of NetworkPolicy semantics, to check flows end to end rather than ports alone: a
# connection passes when the source's egress policies let it out (to a peer its selectors
# pick, on the port) AND the destination's ingress policies let it in. A pod no policy of
# its namespace selects for a direction is not isolated in that direction; only our
# namespace's policies are rendered, so pods elsewhere are not isolated.

NAMESPACE = "voicejury"
Labels = dict[str, str]


class Peer:
    """A pod (labels, namespace) or, with no namespace, an address outside the cluster."""

    def __init__(self, namespace: str | None, labels: Labels, ip: str = "") -> None:
        self.namespace = namespace
        self.labels = labels
        self.ip = ip


# Pods the manifests expect elsewhere (README "Prerequisites") and addresses outside.
OUTSIDE = {
    "kube-dns": Peer("kube-system", {"k8s-app": "kube-dns"}),
    "keda-operator": Peer("keda", {"app": "keda-operator"}),
    "prometheus": Peer("monitoring", {"app.kubernetes.io/name": "prometheus"}),
    "otel-collector": Peer("observability", {"app.kubernetes.io/name": "otel-collector"}),
    "ingress-controller": Peer("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
    "internet": Peer(None, {}, ip="203.0.113.7"),  # clients, PostgreSQL, the LLM, model hubs
}


def _selects_labels(selector: Obj | None, labels: Labels) -> bool:
    """A label selector (matchLabels and matchExpressions); empty selects everything."""
    selector = selector or {}
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if not _selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expression["operator"]]
        if not holds:
            return False
    return True


def _peer_picks(peer: Obj, other: Peer, policy_namespace: str) -> bool:
    """Whether one `to`/`from` entry picks `other`."""
    if "ipBlock" in peer:
        assert set(peer) == {"ipBlock"}, peer
        if not other.ip:
            return False  # pods are picked by selectors (their addresses come and go)
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    assert peer, "a peer needs a podSelector, a namespaceSelector or an ipBlock"
    assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": other.namespace}
        if not _selects_labels(peer["namespaceSelector"], namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False  # a podSelector alone picks pods of the policy's own namespace
    return _selects_labels(peer.get("podSelector"), other.labels)


def _port_allowed(ports: list[Obj] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True  # no ports: every port
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        assert isinstance(entry["port"], int), f"the model knows numeric ports only: {entry}"
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def _lets_through(
    policies: list[Obj], direction: str, pod: Peer, other: Peer, port: int, protocol: str
) -> bool:
    """Whether `pod`'s policies let a connection out to (egress) or in from (ingress) `other`."""
    if pod.namespace != NAMESPACE:
        return True
    kind = direction.capitalize()
    isolating = []
    for policy in policies:
        spec = policy["spec"]
        types = spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]
        if kind in types and _selects_labels(spec["podSelector"], pod.labels):
            isolating.append(policy)
    if not isolating:
        return True
    peers_key = "to" if direction == "egress" else "from"
    for policy in isolating:
        namespace = policy["metadata"].get("namespace", NAMESPACE)
        for rule in policy["spec"].get(direction, []):
            if not _port_allowed(rule.get("ports"), port, protocol):
                continue
            peers = rule.get(peers_key)
            if not peers or any(_peer_picks(peer, other, namespace) for peer in peers):
                return True
    return False


def _reachable(
    objects: list[Obj], source: str, destination: str, port: int, protocol: str = "TCP"
) -> bool:
    pods = {
        o["metadata"]["name"]: Peer(NAMESPACE, o["spec"]["template"]["metadata"]["labels"])
        for o in objects
        if _pod_spec(o) is not None
    }
    peers = {**OUTSIDE, **pods}
    policies = list(of_kind(objects, "NetworkPolicy").values())
    src, dst = peers[source], peers[destination]
    return _lets_through(policies, "egress", src, dst, port, protocol) and _lets_through(
        policies, "ingress", dst, src, port, protocol
    )


Flow = tuple[str, str, int]


def _flows(objects: list[Obj]) -> tuple[list[Flow], list[Flow]]:
    """The connections the system needs, and some it must not have (least privilege)."""
    workloads = [o["metadata"]["name"] for o in objects if _pod_spec(o) is not None]
    needed: list[Flow] = [(w, "kube-dns", 53) for w in workloads]
    for service in SERVICES:
        needed += [(service, "nats", 4222), (service, "minio", 9000)]
        needed.append((service, "otel-collector", 4318))  # OTLP/HTTP
    for obj in objects:
        annotations = (
            obj["spec"]["template"]["metadata"].get("annotations", {}) if _pod_spec(obj) else {}
        )
        if annotations.get("prometheus.io/scrape") == "true":
            needed.append(
                ("prometheus", obj["metadata"]["name"], int(annotations["prometheus.io/port"]))
            )
    needed += [
        ("gateway", "internet", 5432),  # PostgreSQL is outside the cluster
        ("gateway-migrate", "internet", 5432),
        ("jury", "internet", 443),  # the LLM endpoint
        ("models-fetch", "internet", 443),
        ("minio-setup", "minio", 9000),
        ("keda-operator", "nats", 8222),  # consumer lag, for the ScaledObjects
        ("nats", "nats", 6222),  # cluster routes
        ("internet", "gateway", 8000),  # the public API, through a load balancer
        ("ingress-controller", "gateway", 8000),  # or an Ingress
    ]
    denied: list[Flow] = [(s, "internet", 443) for s in SERVICES if s != "jury"]
    denied += [(s, "internet", 5432) for s in SERVICES if s != "gateway"]
    denied += [
        ("internet", "gateway", 9100),  # the metrics are not public
        ("ingress-controller", "gateway", 9100),
        ("internet", "nats", 4222),
        ("internet", "minio", 9000),
        ("internet", "separator", 8081),
        ("gateway-migrate", "nats", 4222),
        ("minio-setup", "internet", 443),
        ("gateway", "separator", 8081),  # stages take work from NATS only
        ("jury", "nats", 8222),
        ("scorer", "internet", 80),
    ]
    return needed, denied


@pytest.mark.parametrize("target", list(TARGETS))
def test_network_policies(target: str) -> None:
    objects = rendered(target)
    policies = of_kind(objects, "NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny["podSelector"] == {}
    assert sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny
    assert "egress" not in deny

    needed, denied = _flows(objects)
    blocked = [flow for flow in needed if not _reachable(objects, *flow)]
    assert not blocked, f"needed flows blocked: {blocked}"
    assert _reachable(objects, "gateway", "kube-dns", 53, "UDP")
    allowed = [flow for flow in denied if _reachable(objects, *flow)]
    assert not allowed, f"flows that must be denied are allowed: {allowed}"

    expected = {
        "gateway": {"nats-client", "s3-client", "db-client"},
        "jury": {"nats-client", "s3-client", "llm-client"},
        **{s: {"nats-client", "s3-client"} for s in ("separator", "pitch", "asr", "scorer")},
    }
    for service, flags in expected.items():
        labels = _deployment(objects, service)["spec"]["template"]["metadata"]["labels"]
        granted = {k.removeprefix("voicejury.dev/") for k, v in labels.items() if v == "true"}
        assert granted == flags, service


def test_the_flow_model_follows_network_policy_semantics() -> None:
    """The model itself, on the cases a wrong reading would get wrong."""
    server = Peer(NAMESPACE, {"app": "server"})
    client = Peer(NAMESPACE, {"role": "client"})
    elsewhere = Peer("other", {"role": "client"})

    def ingress(rule: Obj) -> list[Obj]:
        spec = {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [rule]}
        return [{"metadata": {"namespace": NAMESPACE}, "spec": spec}]

    pods_only = ingress({"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]})
    assert _lets_through(pods_only, "ingress", server, client, 80, "TCP")
    assert not _lets_through(pods_only, "ingress", server, elsewhere, 80, "TCP")
    both = ingress(
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}},
                    "podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]},
                }
            ],
            "ports": [{"port": 80}],
        }
    )
    assert _lets_through(both, "ingress", server, elsewhere, 80, "TCP")
    assert not _lets_through(both, "ingress", server, client, 80, "TCP")  # its namespace
    assert not _lets_through(both, "ingress", server, elsewhere, 81, "TCP")
    assert not _lets_through(both, "ingress", server, elsewhere, 80, "UDP")
    # Not selected by any policy: not isolated. Egress-only policies leave ingress open.
    assert _lets_through(pods_only, "ingress", client, server, 80, "TCP")
    egress_only = [{"metadata": {}, "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}]
    assert _lets_through(egress_only, "ingress", server, elsewhere, 80, "TCP")
    assert not _lets_through(egress_only, "egress", server, elsewhere, 80, "TCP")
    world = ingress({"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["203.0.113.0/24"]}}]})
    assert _lets_through(world, "ingress", server, Peer(None, {}, ip="198.51.100.1"), 1, "TCP")
    assert not _lets_through(world, "ingress", server, OUTSIDE["internet"], 1, "TCP")
    assert not _lets_through(world, "ingress", server, client, 1, "TCP")


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_long_running_workload_has_a_disruption_budget(target: str) -> None:
    """A drain takes one pod of each at a time (maxUnavailable: 1, never minAvailable,
    which would block draining a single replica's node)."""
    objects = rendered(target)
    budgets = of_kind(objects, "PodDisruptionBudget").values()
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in of_kind(objects, kind).items():
            labels = workload["spec"]["template"]["metadata"]["labels"]
            covering = [b for b in budgets if _selects_labels(b["spec"]["selector"], labels)]
            assert len(covering) == 1, f"{kind}/{name}: {len(covering)} disruption budgets"
            assert covering[0]["spec"] == {
                "maxUnavailable": 1,
                "selector": covering[0]["spec"]["selector"],
            }, name


# --------------------------------------------------------------------------- secrets, auth


@pytest.mark.parametrize("target", list(TARGETS))
def test_secrets_hold_only_placeholders(target: str) -> None:
    objects = rendered(target)
    secrets = of_kind(objects, "Secret")
    assert {"voicejury-s3", "voicejury-database", "voicejury-jury", "minio-root"} <= set(secrets)
    # Real keys are long unbroken runs (AWS/MinIO keys, base64, hex) or carry a known prefix;
    # placeholders are short dash-separated words around REPLACE_ME.
    token = re.compile(r"[A-Za-z0-9+/=]{16,}|\b(sk|AKIA|ghp|xox[bp])[-_]?[A-Za-z0-9]")
    for name, secret in secrets.items():
        assert "data" not in secret, f"{name}: templates use stringData, never encoded data"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{name}.{key} must be a {PLACEHOLDER} placeholder"
            rest = value.replace(PLACEHOLDER, "")
            assert not token.search(rest), f"{name}.{key} looks like a real credential"
    sensitive = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|DATABASE_URL)$")
    for obj in objects:
        for container in _pod_containers(obj, init=True):
            for var in container.get("env", []):
                if sensitive.search(var["name"]) and var["name"] != "VJ_S3_ACCESS_KEY_ID":
                    assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]
        if obj["kind"] == "ConfigMap":
            leaked = [k for k in obj.get("data", {}) if sensitive.search(k)]
            assert not leaked, f"ConfigMap/{obj['metadata']['name']} holds secrets {leaked}"


@pytest.mark.parametrize("target", list(TARGETS))
def test_gateway_requires_api_keys(target: str) -> None:
    objects = rendered(target)
    env = effective_env(_main_container(_deployment(objects, "gateway")), objects)
    assert env["VJ_GATEWAY_AUTH_MODE"] == "api_key"
    for obj in objects:
        for container in _pod_containers(obj, init=True):
            assert effective_env(container, objects).get("VJ_GATEWAY_AUTH_MODE") in (
                None,
                "api_key",
            )


def test_no_demo_mode_anywhere_in_deploy() -> None:
    for path in K8S.rglob("*"):
        if path.is_file():
            assert not re.search(r"demo", path.read_text(), re.IGNORECASE), path


# --------------------------------------------------------------------------- images


DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"


def test_one_dockerfile_builds_every_service() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    stages = [line for line in lines if line.upper().startswith("FROM ")]
    assert len(stages) >= 3, "multi-stage: uv, build, runtime"
    assert stages[-1].startswith("FROM ${BASE_IMAGE}")
    syncs = [line for line in lines if "uv sync" in line]
    assert syncs
    for sync in syncs:
        assert "--frozen" in sync
        assert "--no-dev" in sync
        assert "--package voicejury-${SERVICE}" in sync
    users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), "must run as non-root"
    assert text.index("USER ") > text.rindex("FROM "), "USER must be set in the runtime stage"
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    assert json.loads(cmd.removeprefix("CMD ")) == [
        "sh",
        "-c",
        "exec python -m voicejury_${VJ_SERVICE}",
    ]
    assert "nvidia/cuda:" in text  # how to build asr on CTranslate2's CUDA base
    for service in SERVICES:
        assert (REPO / "services" / service / "pyproject.toml").is_file()
