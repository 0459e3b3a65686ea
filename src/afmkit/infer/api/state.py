"""What every route reads: the served model, its scheduler and adapters, the limits, metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

from afmkit.adapters.registry import AdapterRegistry
from afmkit.errors import UserError
from afmkit.infer.api.metrics import Metrics
from afmkit.infer.sampling import SamplingParams
from afmkit.infer.scheduler import Scheduler


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerLimits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # most tokens one request may generate
    default_max_tokens: int = SamplingParams.max_new_tokens  # a request without max_tokens
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name, flag in (
            ("max_prompt_tokens", "--max-prompt-tokens"),
            ("max_tokens", "--max-tokens"),
            ("max_body_bytes", "--max-body-bytes"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value!r}")
        if not isinstance(self.default_max_tokens, int) or self.default_max_tokens < 1:
            raise UserError(f"the default max_tokens must be a positive integer, got {self.default_max_tokens!r}")
        # A lower --max-tokens caps the default too, rather than refusing every request.
        object.__setattr__(self, "default_max_tokens", min(self.default_max_tokens, self.max_tokens))


@dataclasses.dataclass(kw_only=True)
class ServerState:
    model: Any  # a LanguageModel
    served_name: str
    registry: AdapterRegistry | None
    scheduler: Scheduler
    limits: ServerLimits
    api_key: str | None
    metrics: Metrics = dataclasses.field(default_factory=Metrics)


def server_state(request: Any) -> ServerState:
    return request.app.state.server
