"""The Grafana dashboard (deploy/grafana) and the alerting rules (deploy/k8s) query what the gateway
exports: every PromQL expression is read into its series selectors and checked against the
/metrics of a running app (metric names, label names, route templates, enumerated label values).
Also the dashboard's provisioning and the compose `grafana` service."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.http_support import serving
from tests.deploy.promql_support import AGGREGATIONS, Parsed, literal_alternatives, parse
from tests.redis_support import REDIS_URL, scratch_prefix

from service.api import build_app
from service.config import Settings
from service.metrics import ACTIVATION_KINDS, DEGRADED_REASONS, REFUSAL_REASONS, STAGES
from service.scoring.contracts import CandidateResult, ScoreResult

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "reclora.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "reclora.yml"
RULES = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"

# Labels Prometheus adds to every scraped series (static configs and the ServiceMonitor).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# Labels whose values the app pre-creates from its enums, so a misspelt value is caught.
ENUMERATED = {"stage": set(STAGES), "kind": set(ACTIVATION_KINDS)}

# Metrics the alerting rules use that the gateway does not export yet: they belong to the load
# shedding and engine admission work (reclora_shed*, reclora_inflight*, reclora_engine_queue*,
# reclora_llm_*). Name -> its labels. Remove an entry once the gateway exports it; the dashboard
# itself may use none of these.
PLANNED_METRICS: dict[str, set[str]] = {}
PLANNED_PREFIXES = ("reclora_shed", "reclora_inflight", "reclora_engine_queue", "reclora_llm_")
# Metrics of other exporters that the rules use for what a gateway cannot report about itself.
EXTERNAL_METRICS = {
    "up": "Prometheus (scrape health)",
    "kube_deployment_status_replicas_unavailable": "kube-state-metrics",
    "kube_deployment_status_replicas_available": "kube-state-metrics",
    "kube_statefulset_status_replicas_ready": "kube-state-metrics",
}


# ---- a running app and its exposition --------------------------------------------------------

class StandInScorer:
    """A deterministic stand-in for the model runtime (the ``Scorer`` protocol): every item known,
    every score 0.5. Enough for the HTTP layer to record its metrics."""

    model_version = "dashboard-v1"

    def unknown_items(self, ids: Sequence[int]) -> list[int]:
        return []

    async def score(self, user_id: str, candidates: Sequence[int], deadline_ms: int | None = None,
                    request_id: str = "") -> ScoreResult:
        return ScoreResult(user_id=user_id, model_version=self.model_version,
                           candidates=[CandidateResult(item_id=c, score=0.5, llm_score=0.5, crm_score=0.5)
                                       for c in candidates],
                           cold_start=True, timings_ms={"history": 0.5, "crm": 1.0, "total": 2.0})

    def close(self) -> None:
        pass


@dataclass
class Exposition:
    labels: dict[str, set[str]]  # sample name -> label names seen (empty when no series yet)
    values: dict[tuple[str, str], set[str]]  # (sample name, label) -> values seen
    routes: set[str]  # the app's route templates (values of the `route` label)

    @property
    def names(self) -> set[str]:
        return set(self.labels)


SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
                   "unknown": ("",), "untyped": ("",)}


def read_exposition(text: str, routes: set[str]) -> Exposition:
    labels: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SAMPLE_SUFFIXES[family.type]:  # a declared family with no series yet
            labels.setdefault(family.name + suffix, set())
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
            for key, value in sample.labels.items():
                values.setdefault((sample.name, key), set()).add(value)
    return Exposition(labels, values, routes)


@pytest.fixture(scope="module")
def exported() -> Exposition:
    """GET /metrics of an app that served a score request and readiness probes."""
    with scratch_prefix() as prefix:  # as the `redis_prefix` fixture (tests/conftest.py), for the module
        settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix, log_json=True)
        app = build_app(settings, scorer=StandInScorer())

        async def scrape() -> str:
            async with serving(app) as client:
                assert (await client.post("/v1/score", json={"user_id": "dash-1", "candidates": [1, 2, 3]})
                        ).status_code == 200
                assert (await client.get("/readyz")).status_code == 200
                assert (await client.get("/livez")).status_code == 200
                # What the vLLM engine reports per replica (service/api/wiring.py); its collectors
                # are labelled, so they have no series until a replica is configured.
                metrics, replica = app.state.metrics, "http://reclora-vllm-0.reclora-vllm:8000"
                metrics.vllm_replica_up.labels(replica).set(1)
                metrics.vllm_adapters_resident.labels(replica).set(1)
                metrics.vllm_adapter_loads.labels(replica).inc()
                metrics.vllm_adapter_evictions.labels(replica).inc()
                metrics.vllm_adapter_load_latency.labels(replica).observe(0.01)
                assert (await client.get("/metrics")).status_code == 200  # so /metrics has series too
                response = await client.get("/metrics")
                assert response.status_code == 200
                return response.text

        text = anyio.run(scrape)
    exposition = read_exposition(text, set())
    # Route label values: the app's route templates (its OpenAPI paths; /metrics is not in the
    # schema) and those it recorded above.
    seen = exposition.values.get(("reclora_http_request_duration_seconds_count", "route"), set())
    assert {"/v1/score", "/readyz", "/livez", "/metrics"} <= seen
    exposition.routes = set(app.openapi()["paths"]) | seen
    return exposition


# ---- reading the dashboard and the rules -----------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_queries(board: dict) -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every panel target and annotation."""
    out = []
    for panel in panels(board):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"], target.get("legendFormat", "")))
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            out.append((f"annotation {annotation['name']!r}", annotation["expr"], annotation.get("titleFormat", "")))
    return out


def alert_rules() -> list[dict]:
    rule = yaml.safe_load(RULES.read_text())
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def check_selectors(where: str, parsed: Parsed, exposition: Exposition,
                    extra: dict[str, set[str]] | None = None) -> list[str]:
    """Problems with the label matchers and grouping labels of ``parsed``: labels a metric does not
    carry, routes the app does not have, enumerated values it never produces."""
    extra = extra or {}
    problems = []
    known_labels: set[str] = set()
    for selector in parsed.selectors:
        if selector.metric in EXTERNAL_METRICS:
            known_labels |= {m.label for m in selector.matchers}  # another exporter's labels
            continue
        labels = extra.get(selector.metric, exposition.labels.get(selector.metric, set()))
        known_labels |= labels
        for matcher in selector.matchers:
            if matcher.label in TARGET_LABELS:
                continue
            if matcher.label not in labels:
                problems.append(f"{where}: {selector.metric} has no label {matcher.label!r}")
                continue
            values = literal_alternatives(matcher.value)
            if values is None:
                continue
            if matcher.label == "route":
                allowed = exposition.routes
            elif matcher.label == "reason":
                allowed = exposition.values.get((selector.metric, "reason"), set())
            else:
                allowed = ENUMERATED.get(matcher.label)
            if allowed is not None and not set(values) <= allowed:
                problems.append(f"{where}: {selector.metric}{{{matcher.label}}} never takes "
                                f"{sorted(set(values) - allowed)}")
    unknown_grouping = parsed.grouping - known_labels - TARGET_LABELS - {"le"}
    if unknown_grouping:
        problems.append(f"{where}: groups by labels no metric of it has: {sorted(unknown_grouping)}")
    return problems


# ---- the dashboard ---------------------------------------------------------------------------

def test_dashboard_is_a_provisionable_grafana_dashboard():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    assert board.get("id") is None  # provisioning assigns it
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cell = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cell & cells, f"panel {panel['title']!r} overlaps another"
        cells |= cell
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource and target["expr"].strip(), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == datasource


def test_dashboard_queries_only_metrics_the_gateway_exports(exported):
    board = dashboard()
    queries = dashboard_queries(board)
    assert len(queries) >= 20
    missing = {}
    for where, expr, _ in queries:
        for metric in parse(expr).metrics - exported.names:
            missing.setdefault(metric, where)
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
            assert variable["query"]["query"] == variable["definition"]
            assert label in TARGET_LABELS | exported.labels.get(metric, set())
            if metric not in exported.names:
                missing.setdefault(metric, f"variable {variable['name']}")
    assert not missing, f"not exported by the gateway (service/metrics.py): {missing}"


def test_dashboard_label_matchers_grouping_and_legends_fit_the_metrics(exported):
    problems = []
    for where, expr, legend in dashboard_queries(dashboard()):
        parsed = parse(expr)
        problems += check_selectors(where, parsed, exported)
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        if parsed.aggregations:  # only what the aggregation keeps
            available = parsed.grouping - {"le"}
        else:
            available = TARGET_LABELS.union(*(exported.labels.get(m, set()) for m in parsed.metrics))
        if not legend_labels <= available:
            problems.append(f"{where}: legend uses {sorted(legend_labels - available)}, not in the result")
    assert not problems, "\n".join(problems)


def test_dashboard_covers_traffic_scoring_model_vllm_and_health():
    used = set().union(*(parse(expr).metrics for _, expr, _ in dashboard_queries(dashboard())))
    assert {"reclora_http_request_duration_seconds_count", "reclora_http_request_duration_seconds_bucket",
            "reclora_stage_duration_seconds_bucket", "reclora_degraded_responses_total",
            "reclora_adapter_cache_hits_total", "reclora_adapter_cache_misses_total", "reclora_model_info",
            "reclora_model_activations_total", "reclora_model_refusals_total", "reclora_vllm_replica_up"} <= used
    quantiles = {m.group(1) for _, expr, _ in dashboard_queries(dashboard())
                 for m in re.finditer(r"histogram_quantile\(\s*([0-9.]+)\s*,\s*sum by \(le, route\)", expr)}
    assert {"0.5", "0.99"} <= quantiles  # p50 and p99 per route
    readiness = [expr for _, expr, _ in dashboard_queries(dashboard()) if 'route="/readyz"' in expr]
    assert readiness and all('status="503"' in expr for expr in readiness)


def test_settings_named_in_the_dashboard_are_real():
    names = set(re.findall(r"\bRECLORA_[A-Z0-9_]*[A-Z0-9]", DASHBOARD.read_text() + (GRAFANA / "README.md").read_text()))
    assert names and names <= Settings.env_names()


def test_no_planned_metric_on_the_dashboard():
    used = set().union(*(parse(expr).metrics for _, expr, _ in dashboard_queries(dashboard())))
    assert not used & set(PLANNED_METRICS)


# ---- the alerting rules ----------------------------------------------------------------------

def test_planned_and_external_metrics_are_the_few_named_ones():
    assert all(name.startswith(PLANNED_PREFIXES) for name in PLANNED_METRICS)
    assert not set(PLANNED_METRICS) & set(EXTERNAL_METRICS)
    used = set().union(*(parse(r["expr"]).metrics for r in alert_rules()))
    assert set(PLANNED_METRICS) | set(EXTERNAL_METRICS) <= used  # no stale entries


def test_alert_rules_use_exported_planned_or_external_metrics(exported):
    problems = []
    for rule in alert_rules():
        parsed = parse(rule["expr"])
        unknown = parsed.metrics - exported.names - set(PLANNED_METRICS) - set(EXTERNAL_METRICS)
        if unknown:
            problems.append(f"{rule['alert']}: not exported: {sorted(unknown)}")
        planned = {m: labels for m, labels in PLANNED_METRICS.items() if m not in exported.names}
        problems += check_selectors(rule["alert"], parsed, exported, extra=planned)
    assert not problems, "\n".join(problems)


def test_rules_and_dashboard_agree_on_the_job(exported):
    """The dashboard's `job` variable and the rules' job="reclora-gateway" both find the series of
    the compose stack's scrape job."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    rule_jobs = {m.value for r in alert_rules() for s in parse(r["expr"]).selectors for m in s.matchers
                 if m.label == "job"}
    assert rule_jobs == {"reclora-gateway"} and rule_jobs <= jobs
    for _, expr, _ in dashboard_queries(dashboard()):
        for selector in parse(expr).selectors:
            assert [m.value for m in selector.matchers if m.label == "job"] == ["$job"], expr


def test_the_reader_rejects_what_it_cannot_read():
    from tests.deploy.promql_support import PromQLError

    for bad in ("rat(reclora_x[5m])", "sum(reclora_x", "reclora_x{route=/v1}", "reclora_x[5q]", "{job='a'}",
                "sum by (route (x)"):
        with pytest.raises(PromQLError):
            parse(bad)
    parsed = parse('sum by (le, route) (rate(a_bucket{route="/v1/score"}[$__rate_interval])) / on (route) b')
    assert parsed.metrics == {"a_bucket", "b"} and parsed.grouping == {"le", "route"}
    assert parsed.aggregations == {"sum"} and "rate" not in AGGREGATIONS


# ---- provisioning and compose ----------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_grafana_with_the_provisioning_read_only(compose):
    grafana = compose["services"]["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana" and re.fullmatch(r"\d+\.\d+\.\d+", tag), grafana["image"]
    assert "prometheus" in grafana["depends_on"]
    assert any(str(p).split(":")[-1] == "3000" for p in grafana["ports"])

    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
            assert mode == ["ro"], volume
        else:
            assert source in compose["volumes"], source
    for kind in ("datasources", "dashboards"):
        source, _ = mounts[f"/etc/grafana/provisioning/{kind}"]
        assert (ROOT / source).is_dir() and list((ROOT / source).glob("*.yml")), source

    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    dashboards_dir = provider["options"]["path"]
    mounted = {target: source for target, (source, _) in mounts.items() if target.startswith(dashboards_dir + "/")}
    assert [ROOT / s for s in mounted.values()] == [DASHBOARD]
    env = grafana["environment"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in mounted


def test_datasource_points_at_the_compose_prometheus(compose):
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.hostname in compose["services"]
    assert any(str(p).endswith(f":{url.port}") for p in compose["services"]["prometheus"]["ports"])
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "reclora-gateway"]
    assert source["jsonData"]["timeInterval"] == job["scrape_interval"]
