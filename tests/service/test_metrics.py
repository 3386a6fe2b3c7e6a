"""Metrics: per-instance registries, ms-to-seconds stage timings, bounded label sets."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from service.metrics import DEGRADED_REASONS, LATENCY_BUCKETS_S, STAGES, Metrics
from service.personalization.adapter_cache import AdapterCacheOutcome
from service.scoring.contracts import DegradedReason, Stage
from service.telemetry import Quantity


def test_instances_do_not_share_a_registry():
    a, b = Metrics(), Metrics()
    a.events_appended.inc(3)
    assert a.registry.get_sample_value("reclora_events_appended_total") == 3
    assert b.registry.get_sample_value("reclora_events_appended_total") == 0
    assert REGISTRY.get_sample_value("reclora_events_appended_total") is None


def test_stage_timings_are_recorded_in_seconds():
    m = Metrics(process=False)
    m.measure(Stage.CRM, 7.0)
    get = m.registry.get_sample_value
    assert get("reclora_stage_duration_seconds_sum", {"stage": "crm"}) == pytest.approx(0.007)
    assert get("reclora_stage_duration_seconds_bucket", {"stage": "crm", "le": "0.01"}) == 1
    assert get("reclora_stage_duration_seconds_bucket", {"stage": "crm", "le": "0.005"}) == 0


def test_known_stages_and_reasons_exist_before_any_request():
    m = Metrics(process=False)
    for stage in STAGES:
        assert m.registry.get_sample_value("reclora_stage_duration_seconds_count", {"stage": stage}) == 0
    for reason in DEGRADED_REASONS:
        assert m.registry.get_sample_value("reclora_degraded_responses_total", {"reason": reason}) == 0


def test_buckets_cover_a_millisecond_to_ten_seconds():
    assert LATENCY_BUCKETS_S[0] <= 0.001 and LATENCY_BUCKETS_S[-1] == 10.0
    assert list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S)


def test_request_degraded_cache_and_model_collectors():
    m = Metrics(process=False)
    m.observe_request("POST", "/v1/score", 200, 0.02)
    m.count(DegradedReason.LLM_TIMEOUT)
    m.count(AdapterCacheOutcome.HIT)
    m.count(AdapterCacheOutcome.MISS, 2)
    m.count(AdapterCacheOutcome.EVICT)
    m.measure(Quantity.ADAPTER_CACHE_BYTES, 1024)
    m.set_model_version("v1")
    m.set_model_version("v2")
    get = m.registry.get_sample_value
    assert get("reclora_http_request_duration_seconds_count",
               {"method": "POST", "route": "/v1/score", "status": "200"}) == 1
    assert get("reclora_degraded_responses_total", {"reason": "llm_timeout"}) == 1
    assert (get("reclora_adapter_cache_hits_total"), get("reclora_adapter_cache_misses_total"),
            get("reclora_adapter_cache_evictions_total"), get("reclora_adapter_cache_bytes")) == (1, 2, 1, 1024)
    assert get("reclora_model_info", {"version": "v2"}) == 1
    assert get("reclora_model_info", {"version": "v1"}) is None  # one version at a time


def test_render_negotiates_the_format():
    m = Metrics()
    text, content_type = m.render()
    assert content_type.startswith("text/plain") and b"reclora_stage_duration_seconds_bucket" in text
    assert b"process_" in text or b"python_gc" in text
    _, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")


def test_every_outcome_and_quantity_a_component_reports_lands_on_a_series():
    """Components report through ``Telemetry``; each enum they report must map to a collector here,
    its members pre-created where the collector is labelled by them."""
    from service.engine.vllm.adapters import ReplicaAdapterOutcome
    from service.nearline.knowledge_refresh import RefreshOutcome
    from service.nearline.served_log import ServedLogOutcome
    from service.registry.errors import ActivationKind, RefusalReason
    from service.registry.guard import GuardRail
    from service.scoring.contracts import Admission, CandidateSource, ScoreCacheOutcome, ServedOutcome, ShadowOutcome
    from service.scoring.engine_scheduler import BackgroundOutcome, RequestWorkOutcome
    from service.scoring.online_eval import LabelOutcome
    from service.scoring.user_knowledge import KnowledgeOutcome

    m = Metrics(process=False)
    before = m.render()[0]
    kinds = (DegradedReason, Admission, CandidateSource, ScoreCacheOutcome, ShadowOutcome, KnowledgeOutcome,
             BackgroundOutcome, RequestWorkOutcome, ServedLogOutcome, LabelOutcome, RefreshOutcome, RefusalReason,
             GuardRail, AdapterCacheOutcome, ReplicaAdapterOutcome, ServedOutcome, ActivationKind)
    for kind in kinds:
        for member in kind:
            on = {ReplicaAdapterOutcome: "http://replica-0:8000", ServedOutcome: "candidate",
                  ActivationKind: "v9"}.get(kind)
            text = m.render()[0]
            m.count(member, 2, on=on)
            assert m.render()[0] != text, f"{kind.__name__}.{member.name} changed no series"
    for quantity in (*Stage, *Quantity):
        on = "http://replica-0:8000" if quantity.name.startswith("REPLICA") else None
        m.measure(quantity, 3.0, on=on)
    get = m.registry.get_sample_value
    assert get("reclora_model_activations_total", {"kind": "promote"}) == 2
    assert get("reclora_model_info", {"version": "v9"}) == 1
    assert get("reclora_canary_aborts_total", {"rail": "operator"}) == 2
    assert get("reclora_vllm_replica_up", {"replica": "http://replica-0:8000"}) == 3.0
    for reason in DegradedReason:  # labelled counters list every member before anything is counted
        assert f'reason="{reason.value}"'.encode() in before
