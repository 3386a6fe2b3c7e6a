"""The request path of POST /v1/score (``pipeline``, ``stages``) and what it promises the rest of
the service (``contracts``): history, long-short retrieval, CRM, adapter, LLM, fusion."""
