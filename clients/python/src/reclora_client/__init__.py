"""Python client of the RecLoRA serving gateway: typed answers, typed errors, safe retries.

    with RecLoRAClient("http://reclora:8000") as client:
        ranked = client.score(196, [50, 172, 181], deadline_ms=300)
"""

__version__ = "0.1.0"

from reclora_client.client import AsyncRecLoRAClient, ClientOptions, RecLoRAClient  # noqa: E402
from reclora_client.errors import (  # noqa: E402
    Conflict,
    ConnectionFailed,
    ContentTooLarge,
    InternalError,
    InvalidRequest,
    NetworkError,
    NotFound,
    Overloaded,
    RecLoRAError,
    TimedOut,
    Unavailable,
    UnexpectedResponse,
)
from reclora_client.models import (  # noqa: E402
    AdapterExplanation,
    CandidateExplanation,
    CandidateScore,
    ErrorDetail,
    Event,
    EventsResponse,
    ExplainResponse,
    GateMixture,
    GroupMixture,
    MetaWeight,
    ReadBehaviour,
    HistoryResponse,
    ProfileResponse,
    ScoreResponse,
)

__all__ = [
    "AdapterExplanation", "AsyncRecLoRAClient", "CandidateExplanation", "CandidateScore", "ClientOptions", "Conflict",
    "ConnectionFailed", "ContentTooLarge", "ErrorDetail", "Event", "EventsResponse", "ExplainResponse", "GateMixture",
    "GroupMixture", "HistoryResponse", "InternalError", "InvalidRequest", "MetaWeight", "NetworkError", "NotFound",
    "Overloaded", "ProfileResponse", "ReadBehaviour", "RecLoRAClient", "RecLoRAError", "ScoreResponse", "TimedOut",
    "Unavailable", "UnexpectedResponse", "__version__",
]
