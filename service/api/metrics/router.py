"""``GET /metrics``: the app's own Prometheus registry in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Header, Response

from service.api.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(metrics: MetricsDep, accept: str = Header("")) -> Response:
    body, content_type = metrics.render(accept)
    return Response(body, media_type=content_type)
