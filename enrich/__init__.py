"""enrich: enrich dataframes through Parallel's Task API.

The public surface is what `__all__` lists; everything else lives in private modules, one concept each:
`_client` (the async Task API client), `_limiter` (the shared rate limiter), `_emulator` (the local
Task API), `_exceptions` (the error tree), `_models` (typed API values).
"""

import logging as _logging
from importlib import metadata as _metadata

from enrich._client import TaskClient
from enrich._emulator import Emulator, EmulatorConfig, create_app
from enrich._engine import (
    JobPlan,
    JobStats,
    Pilot,
    PilotReport,
    aenrich,
    aenrich_shard,
    cache_dir,
    enrich,
    plan,
)
from enrich._exceptions import (
    APIError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    CheckpointError,
    CheckpointMismatchError,
    ConflictError,
    EnrichError,
    ForeignRunError,
    NotFoundError,
    OutcomeUnknownError,
    OutputError,
    PaymentRequiredError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceMismatchError,
    StillRunningError,
    TransportError,
    UsageError,
    ValidationError,
)
from enrich._limiter import RateLimiter
from enrich._models import (
    AddRunsResponse,
    Citation,
    ErrorObject,
    FieldBasis,
    GroupStatus,
    TaskGroup,
    TaskOutput,
    TaskRun,
    TaskRunResult,
)
from enrich._processors import PROCESSORS
from enrich._progress import Progress
from enrich._retry import RetryPolicy
from enrich._store import CheckpointStore, LocalStore, MemoryStore
from enrich._store_object import ObjectStore

# The library's log ("enrich") reaches the handlers an application configures, never stderr by itself.
_logging.getLogger("enrich").addHandler(_logging.NullHandler())

try:
    __version__ = _metadata.version("enrich")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "PROCESSORS",
    "APIError",
    "APIStatusError",
    "AddRunsResponse",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointStore",
    "Citation",
    "ConflictError",
    "Emulator",
    "EmulatorConfig",
    "EnrichError",
    "ErrorObject",
    "FieldBasis",
    "ForeignRunError",
    "GroupStatus",
    "JobPlan",
    "JobStats",
    "LocalStore",
    "MemoryStore",
    "NotFoundError",
    "ObjectStore",
    "OutcomeUnknownError",
    "OutputError",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "Pilot",
    "PilotReport",
    "Progress",
    "RateLimitError",
    "RateLimiter",
    "RetryPolicy",
    "ServerError",
    "ServiceMismatchError",
    "StillRunningError",
    "TaskClient",
    "TaskGroup",
    "TaskOutput",
    "TaskRun",
    "TaskRunResult",
    "TransportError",
    "UsageError",
    "ValidationError",
    "aenrich",
    "aenrich_shard",
    "cache_dir",
    "create_app",
    "enrich",
    "plan",
]
