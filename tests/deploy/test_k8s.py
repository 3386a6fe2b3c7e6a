"""The Kubernetes manifests (deploy/k8s): every overlay renders with kustomize, validates against
the Kubernetes API schemas, and agrees with the service: real settings, probes on /livez and
/readyz, a termination grace period longer than the drain, locked-down containers, vLLM flags
that fit the gateways' settings, and alerting rules that parse."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from tests.deploy.k8s_support import (GATEWAY, K8S, OVERLAYS, README, REDIS_CLUSTER_OVERLAYS, ROOT, SAMPLE_DIGEST,
                                      SETTINGS_ENV, claim_of, containers, flags, gateway_container, gateways,
                                      history_store, mount_at, named, objects, pod_spec, render, resolved_env,
                                      selects, settings_of, volume_of, workloads)
from tests.deploy.promql_support import literal_alternatives, parse

VLLM_DOC = ROOT / "docs" / "VLLM.md"
KUBERNETES_VERSION = "1.32.0"  # schemas shipped with kubernetes-validate; the oldest release targeted
CRD_GROUPS = ("monitoring.coreos.com/",)  # Prometheus Operator kinds: no schema in kubernetes-validate
# Read by the `reclora` command line, not the gateway: the README's push example (training/admin) and
# the knowledge Job's vLLM interpreter (training/knowledge).
CLI_ENV = {"RECLORA_ADMIN_URL", "RECLORA_ADMIN_TOKEN", "RECLORA_VLLM_PYTHON"}
# The engine each overlay's gateways score on (RECLORA_ENGINE).
ENGINES = {"cpu-gateway": "torch", "gpu-vllm": "vllm", "cpu-gateway-redis-cluster": "torch"}


# ---- rendering and schemas -------------------------------------------------------------------

def test_both_overlays_exist():
    assert {"cpu-gateway", "gpu-vllm"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    failures, skipped = [], set()
    for obj in render(overlay):
        if obj["apiVersion"].startswith(CRD_GROUPS):
            skipped.add(obj["kind"])
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert not failures, "\n".join(failures)
    assert skipped == {"ServiceMonitor", "PrometheusRule"}  # checked by structure below


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(overlay):
    present = {(o["kind"], o["metadata"]["name"]) for o in render(overlay)}
    expected = {("Deployment", GATEWAY), ("Deployment", "reclora-gateway-admin"), ("Service", GATEWAY),
                ("Service", "reclora-gateway-admin"), ("HorizontalPodAutoscaler", GATEWAY),
                ("PodDisruptionBudget", GATEWAY), ("PersistentVolumeClaim", "reclora-model-store"),
                ("PersistentVolumeClaim", "reclora-base-model"), ("ServiceMonitor", GATEWAY), ("PrometheusRule", "reclora")}
    redis = "reclora-redis-cluster" if overlay in REDIS_CLUSTER_OVERLAYS else "reclora-redis"
    expected |= {("StatefulSet", redis), ("Service", redis), ("NetworkPolicy", redis)}
    if overlay == "gpu-vllm":
        expected |= {("StatefulSet", "reclora-vllm"), ("Service", "reclora-vllm"),
                     ("PersistentVolumeClaim", "reclora-adapters")}
    assert expected <= present, sorted(expected - present)
    namespaces = {o["metadata"].get("namespace") for o in render(overlay) if o["kind"] != "Namespace"}
    assert namespaces == {"reclora"}


# ---- gateway settings ------------------------------------------------------------------------

def test_every_reclora_variable_in_the_manifests_is_a_setting():
    """Every RECLORA_* name written anywhere under deploy/k8s (manifests, comments, README)."""
    cli_source = "".join(p.read_text() for package in ("admin", "knowledge")
                         for p in (ROOT / "training" / package).glob("*.py"))
    assert all(name in cli_source for name in CLI_ENV)
    unknown, seen = {}, set()
    for path in sorted(K8S.rglob("*")):
        if path.is_file():
            for name in re.findall(r"\bRECLORA_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
                seen.add(name)
                if name not in SETTINGS_ENV | CLI_ENV:
                    unknown.setdefault(name, str(path.relative_to(ROOT)))
    assert not unknown, f"not settings of service/config.py: {unknown}"
    assert len(seen) > 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_environment_names_are_settings(overlay):
    for workload in workloads(overlay):
        for container in containers(workload):
            names = set(resolved_env(overlay, workload, container)) if container.get("envFrom") else \
                {e["name"] for e in container.get("env", [])}
            unknown = {n for n in names if n.startswith("RECLORA_")} - SETTINGS_ENV
            assert not unknown, f"{workload['metadata']['name']}: {sorted(unknown)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_environment_makes_valid_settings(overlay, monkeypatch):
    for deployment in gateways(overlay):
        settings = settings_of(overlay, deployment, monkeypatch)
        container = gateway_container(deployment)
        assert settings.http.host == "0.0.0.0"
        assert settings.model.engine == ENGINES[overlay]
        assert claim_of(deployment, container, str(settings.model.model_store)) == "reclora-model-store"
        assert claim_of(deployment, container, str(settings.model.base_model_dir)) == "reclora-base-model"
        assert settings.model.active_version is None and settings.model.follows_store  # followers track ACTIVE

        # The Redis URL names the history store through its headless Service: the single node's
        # pod, or the cluster's Service itself (test_k8s_redis_cluster.py).
        redis = history_store(overlay)
        service = named(overlay, "Service", redis["spec"]["serviceName"])
        url = urlsplit(settings.history.redis_url)
        assert url.port in {p["port"] for p in service["spec"]["ports"]}
        assert settings.history.redis_cluster is (overlay in REDIS_CLUSTER_OVERLAYS)
        if not settings.history.redis_cluster:
            assert redis["spec"]["replicas"] == 1
            assert url.hostname == f"{redis['metadata']['name']}-0.{service['metadata']['name']}"

        if settings.torch.torch_threads is not None:  # no more threads than the CPU quota
            assert settings.torch.torch_threads <= float(container["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_admin_gateway_writes_the_store_and_followers_only_read_it(overlay, monkeypatch):
    by_name = {d["metadata"]["name"]: d for d in gateways(overlay)}
    assert set(by_name) == {GATEWAY, "reclora-gateway-admin"}
    admin, follower = by_name["reclora-gateway-admin"], by_name[GATEWAY]

    admin_settings = settings_of(overlay, admin, monkeypatch)
    assert admin_settings.admin.admin_enabled and admin_settings.admin.admin_token_sha256 == [SAMPLE_DIGEST]
    (token,) = [e for e in gateway_container(admin)["env"] if e["name"] == "RECLORA_ADMIN_TOKEN_SHA256"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "reclora-admin-token", "key": "admin-token-sha256"}
    assert admin["spec"]["replicas"] == 1 and admin["spec"]["strategy"]["type"] == "Recreate"
    mount = mount_at(admin, gateway_container(admin), str(admin_settings.model.model_store))
    assert not mount.get("readOnly", False)
    assert not volume_of(admin, mount)["persistentVolumeClaim"].get("readOnly", False)

    follower_settings = settings_of(overlay, follower, monkeypatch)
    assert not follower_settings.admin.admin_enabled and not follower_settings.admin.admin_token_sha256
    container = gateway_container(follower)
    for path in (follower_settings.model.model_store, follower_settings.model.base_model_dir):
        mount = mount_at(follower, container, str(path))
        assert mount["readOnly"] is True and volume_of(follower, mount)["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_reading_settings_get_no_service_link_variables(overlay):
    """Service links would put RECLORA_GATEWAY_PORT=tcp://... and the like into the environment of
    pods in this namespace, since every Service is named reclora-*."""
    assert all(s["metadata"]["name"].startswith("reclora-") for s in objects(overlay, "Service"))
    for workload in workloads(overlay):
        assert pod_spec(workload).get("enableServiceLinks") is False, workload["metadata"]["name"]
        assert pod_spec(workload).get("automountServiceAccountToken") is False, workload["metadata"]["name"]


# ---- probes, drain, security, resources ------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_map_to_livez_and_readyz(overlay, monkeypatch):
    for deployment in gateways(overlay):
        settings = settings_of(overlay, deployment, monkeypatch)
        container = gateway_container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, (deployment["metadata"]["name"], probe)
            assert ports.get(get["port"], get["port"]) == settings.http.port == 8000
        # The readiness probe must notice a 503 within the drain window.
        readiness = container["readinessProbe"]
        assert readiness["periodSeconds"] <= settings.http.shutdown_delay_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_period_outlasts_the_drain(overlay, monkeypatch):
    for deployment in gateways(overlay):
        settings = settings_of(overlay, deployment, monkeypatch)
        assert settings.http.shutdown_delay_s > 0
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace > settings.http.shutdown_delay_s + settings.http.graceful_timeout_s, deployment["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_locked_down(overlay):
    for workload in workloads(overlay):
        pod = pod_spec(workload).get("securityContext", {})
        for container in containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod.get("runAsUser")) not in (None, 0), where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not ctx.get("privileged", False) and not ctx.get("capabilities", {}).get("add"), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes(overlay):
    """With a read-only root filesystem, /tmp and the caches (XDG_CACHE_HOME: the native kernels)
    must be emptyDirs."""
    for workload in workloads(overlay):
        for container in containers(workload):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            paths = [env[k] for k in ("XDG_CACHE_HOME", "HOME", "NUMBA_CACHE_DIR") if env.get(k)]
            if workload in gateways(overlay) or workload["metadata"]["name"] == "reclora-vllm":
                assert "XDG_CACHE_HOME" in env
                paths.append("/tmp")
            for path in paths:
                volume = volume_of(workload, mount_at(workload, container, path))
                assert "emptyDir" in volume, f"{workload['metadata']['name']}: {path} is not on an emptyDir"
                assert not mount_at(workload, container, path).get("readOnly", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_a_memory_limit(overlay):
    for workload in workloads(overlay):
        for container in containers(workload):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert "memory" in resources["limits"], container["name"]


# ---- scaling and disruption ------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_and_disruption_budget_cover_the_followers_only(overlay):
    follower, admin = named(overlay, "Deployment", GATEWAY), named(overlay, "Deployment", "reclora-gateway-admin")
    follower_labels = follower["spec"]["template"]["metadata"]["labels"]
    admin_labels = admin["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in follower["spec"]  # the HPA owns it

    hpa = named(overlay, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    pdb = named(overlay, "PodDisruptionBudget", GATEWAY)
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selects(selector, follower_labels) and not selects(selector, admin_labels)
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]

    service, admin_service = named(overlay, "Service", GATEWAY), named(overlay, "Service", "reclora-gateway-admin")
    assert selects(service["spec"]["selector"], follower_labels)
    assert not selects(service["spec"]["selector"], admin_labels)  # admin pods take no client traffic
    assert selects(admin_service["spec"]["selector"], admin_labels)
    assert not selects(admin_service["spec"]["selector"], follower_labels)


# ---- Redis -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_persists_with_aof_on_a_claim(overlay):
    redis = history_store(overlay)
    (container,) = containers(redis)
    args = container["args"]
    assert args[0] == "redis-server"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    data_dir = args[args.index("--dir") + 1]
    mount = mount_at(redis, container, data_dir)
    assert mount["mountPath"] == data_dir
    assert mount["name"] in {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    service = named(overlay, "Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])

    policy = named(overlay, "NetworkPolicy", redis["metadata"]["name"])
    assert selects(policy["spec"]["podSelector"]["matchLabels"], redis["spec"]["template"]["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    for gateway in gateways(overlay):
        assert any(selects(peer["podSelector"]["matchLabels"], gateway["spec"]["template"]["metadata"]["labels"])
                   for peer in rule["from"])


# ---- vLLM (gpu-vllm) -------------------------------------------------------------------------

def test_vllm_servers_run_with_the_documented_flags(monkeypatch):
    vllm = named("gpu-vllm", "StatefulSet", "reclora-vllm")
    (container,) = containers(vllm)
    args = flags(container["args"])
    block = re.search(r"python -m vllm\.entrypoints\.openai\.api_server(.*?)```", VLLM_DOC.read_text(), re.S).group(1)
    documented = set(re.findall(r"(--[a-z][a-z0-9-]*)", block))
    assert documented <= set(args), f"flags of docs/VLLM.md missing: {sorted(documented - set(args))}"
    assert "--enable-lora" in args and "--enable-prefix-caching" in args
    assert json.loads(args["--hf-overrides"]) == {"head_dtype": "float32"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"

    settings = {d["metadata"]["name"]: settings_of("gpu-vllm", d, monkeypatch) for d in gateways("gpu-vllm")}
    follower = settings[GATEWAY]
    # --max-lora-rank: an allowed vLLM value, at least the rank the gateways accept in a push.
    rank = int(args["--max-lora-rank"])
    assert rank in {1, 8, 16, 32, 64, 128, 256, 320, 512}
    assert all(s.model.max_lora_rank <= rank for s in settings.values())
    # --max-cpu-loras: every gateway registers up to vllm_max_adapters of its own per server, and
    # the prototypes of two versions stay loaded beside them; --max-loras: one version's prototypes.
    hpa = named("gpu-vllm", "HorizontalPodAutoscaler", GATEWAY)
    most_gateways = hpa["spec"]["maxReplicas"] + named("gpu-vllm", "Deployment", "reclora-gateway-admin")["spec"]["replicas"]
    prototypes = max(s.model.max_prototypes for s in settings.values())
    assert int(args["--max-cpu-loras"]) >= follower.vllm.vllm_max_adapters * most_gateways + 2 * prototypes
    assert int(args["--max-loras"]) >= prototypes
    # The served base model is the one the gateways tokenize with, from the same claim.
    model = args["--model"]
    assert Path(model).name == follower.model.base_model_dir.name
    assert claim_of(vllm, container, model) == "reclora-base-model"
    assert mount_at(vllm, container, model)["readOnly"] is True

    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1


def test_gateways_address_each_vllm_replica_and_share_its_adapter_volume(monkeypatch):
    vllm = named("gpu-vllm", "StatefulSet", "reclora-vllm")
    (server,) = containers(vllm)
    service = named("gpu-vllm", "Service", vllm["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # one DNS name per pod, no load balancing
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    replicas = {f"http://{vllm['metadata']['name']}-{i}.{service['metadata']['name']}:{port}"
                for i in range(vllm["spec"]["replicas"])}

    adapter_dirs = set()
    for deployment in gateways("gpu-vllm"):
        settings = settings_of("gpu-vllm", deployment, monkeypatch)
        assert {str(u).rstrip("/") for u in settings.vllm.vllm_urls} == replicas
        assert settings.vllm.vllm_url is None
        container = gateway_container(deployment)
        adapter_dir = str(settings.vllm.vllm_adapter_dir)
        mount = mount_at(deployment, container, adapter_dir)
        assert not mount.get("readOnly", False)
        assert claim_of(deployment, container, adapter_dir) == "reclora-adapters"
        # The servers read the same files at the same path (no RECLORA_VLLM_ADAPTER_SERVER_DIR) ...
        assert settings.vllm.vllm_adapter_server_dir is None
        assert claim_of(vllm, server, adapter_dir) == "reclora-adapters"
        assert mount_at(vllm, server, adapter_dir)["mountPath"] == mount["mountPath"]
        assert mount_at(vllm, server, adapter_dir)["readOnly"] is True
        # ... and each gateway pod writes a directory of its own (it deletes what it evicts).
        assert f"{deployment['metadata']['name']}-5d9c7b6f4-x2x7q" in adapter_dir
        adapter_dirs.add(adapter_dir)
    assert len(adapter_dirs) == len(gateways("gpu-vllm"))

    policy = named("gpu-vllm", "NetworkPolicy", "reclora-vllm")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], vllm["spec"]["template"]["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    assert [p["podSelector"]["matchLabels"] for p in rule["from"]] == [{"app.kubernetes.io/name": GATEWAY}]


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if ENGINES[o] == "torch"])
def test_cpu_overlay_has_no_gpu_parts(overlay):
    text = yaml.safe_dump_all(render(overlay))
    assert "nvidia.com/gpu" not in text and "reclora-vllm" not in text


# ---- monitoring (Prometheus Operator kinds: structure only) ----------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_every_gateway_service(overlay):
    (monitor,) = objects(overlay, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s for s in objects(overlay, "Service") if selects(selector, s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in scraped} == {GATEWAY, "reclora-gateway-admin"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for service in scraped:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == GATEWAY  # job="reclora-gateway"


def alert_rules(overlay: str) -> list[dict]:
    (rule,) = objects(overlay, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alert_rules_are_complete_and_parse(overlay):
    rules = alert_rules(overlay)
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    workloads_by_kind = {kind: {o["metadata"]["name"] for o in objects(overlay, kind)}
                         for kind in ("Deployment", "StatefulSet")}
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        parsed = parse(rule["expr"])
        for selector in parsed.selectors:
            for matcher in selector.matchers:
                values = literal_alternatives(matcher.value)
                if matcher.label == "job":
                    assert values == [GATEWAY], rule["alert"]
                if matcher.label in ("deployment", "statefulset"):
                    kind = "Deployment" if matcher.label == "deployment" else "StatefulSet"
                    assert values and set(values) <= workloads_by_kind[kind], rule["alert"]

    def alerting_on(metric: str, route: str | None = None) -> list[str]:
        return [r["alert"] for r in rules if any(
            s.metric == metric and (route is None or any(m.label == "route" and m.value == route for m in s.matchers))
            for s in parse(r["expr"]).selectors)]
    assert alerting_on("reclora_http_request_duration_seconds_bucket", "/v1/score")  # p99 latency
    assert alerting_on("reclora_degraded_responses_total")
    assert alerting_on("reclora_shed_responses_total")
    assert alerting_on("up") and alerting_on("kube_deployment_status_replicas_unavailable")  # not ready
    assert alerting_on("kube_statefulset_status_replicas_ready")  # Redis down


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_latency_objective_is_not_below_the_default_deadline(overlay, monkeypatch):
    settings = settings_of(overlay, named(overlay, "Deployment", GATEWAY), monkeypatch)
    (rule,) = [r for r in alert_rules(overlay) if r["alert"] == "RecloraScoreLatencyHigh"]
    assert re.sub(r"\s+", "", rule["expr"]).startswith("histogram_quantile(0.99,")
    objective = float(re.search(r">\s*([0-9.]+)\s*$", rule["expr"]).group(1))
    assert objective >= settings.requests.default_deadline_ms / 1000


# ---- README ----------------------------------------------------------------------------------

def test_readme_explains_every_overlay_and_the_admin_secret():
    text = README.read_text()
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in text
        assert f"kubectl kustomize deploy/k8s/overlays/{overlay}" in text
    assert "kubectl create secret generic reclora-admin-token" in text
    assert "--from-literal=admin-token-sha256=" in text
    assert "{u:" in text and "Redis Cluster" in text  # the managed Redis note
