"""Graders for side-by-side comparisons: an LLM judge, a reward model, (and people, in sxs_ui).

A ``Grader`` looks at one prompt and two responses *in the order shown* (``first``,
``second``) and returns a ``PairGrade``: which shown response is better and by how much, on the
scale of Apple's human preference data (much better / better / slightly better / negligibly
better, or a tie). ``sxs`` asks every grader about both orders and maps the answers back to
models, which cancels a grader's preference for a position.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from afmkit.errors import UserError

# Apple's four preference strengths, strongest first.
STRENGTHS = ("much better", "better", "slightly better", "negligibly better")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairGrade:
    winner: str  # "first", "second" or "tie" (positions as shown), or "invalid" (unparseable)
    strength: str | None = None  # one of STRENGTHS when there is a winner
    raw: str = ""  # the grader's own output, for auditing

    def __post_init__(self) -> None:
        if self.winner not in ("first", "second", "tie", "invalid"):
            raise ValueError(f"bad winner {self.winner!r}")
        if self.winner in ("first", "second") and self.strength not in STRENGTHS:
            raise ValueError(f"bad strength {self.strength!r}")


@runtime_checkable
class Grader(Protocol):
    name: str

    def grade(self, *, prompt: str, first: str, second: str) -> PairGrade: ...


# -- reward model ------------------------------------------------------------------------------
RewardFunction = Callable[[str, str], float]


@dataclasses.dataclass
class RewardModelGrader:
    """Prefers the response with the higher reward ``score(prompt, response)``.

    The margin in reward points maps to a strength: ``>= much`` much better, ``>= better``
    better, ``>= slightly`` slightly better, ``> tie`` negligibly better, else a tie. The
    defaults suit rewards on a logit scale (Bradley-Terry: a margin of 2 is a ~88% preference).
    Any callable works; ``reward_model_grader`` plugs in the post-training reward model.
    """

    score: RewardFunction
    name: str = "reward-model"
    tie: float = 0.0
    slightly: float = 0.5
    better: float = 1.0
    much: float = 2.0

    def grade(self, *, prompt: str, first: str, second: str) -> PairGrade:
        a, b = float(self.score(prompt, first)), float(self.score(prompt, second))
        margin = abs(a - b)
        if margin <= self.tie:
            return PairGrade(winner="tie", raw=f"{a:.4f} vs {b:.4f}")
        strength = (
            "much better"
            if margin >= self.much
            else "better"
            if margin >= self.better
            else "slightly better"
            if margin >= self.slightly
            else "negligibly better"
        )
        return PairGrade(winner="first" if a > b else "second", strength=strength, raw=f"{a:.4f} vs {b:.4f}")


def reward_model_grader(directory: str, base: Any = None, *, dtype: Any = None) -> RewardModelGrader:
    """A reward model trained by ``afmkit posttrain reward --out DIR`` as a grader: it scores the
    exchange (the prompt as a user turn, the response as the assistant's) and prefers the
    higher score; its scores are Bradley-Terry logits, the scale ``RewardModelGrader``'s
    thresholds assume. ``base``: the model it runs on (a ``LanguageModel`` or a name/path;
    default the base recorded in the reward model), refused with one line when its tokenizer,
    or for an adapter trunk its weights, are not the ones the reward model was trained with.
    Each (prompt, response) is scored once, though ``sxs`` shows every pair in both orders."""
    from pathlib import Path

    from afmkit.posttrain.reward_model import load_reward_model, read_reward_metadata

    meta = read_reward_metadata(directory)
    if base is None or isinstance(base, str):
        from afmkit.lm import load

        base = load(base or meta["base_name"], dtype=dtype)
    model = load_reward_model(directory, base, dtype=dtype)
    cache: dict[tuple[str, str], float] = {}

    def score(prompt: str, response: str) -> float:
        if (prompt, response) not in cache:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            cache[prompt, response] = float(model.score([messages])[0])
        return cache[prompt, response]

    return RewardModelGrader(score, name=f"reward-model:{Path(directory).name}")


def is_reward_model_dir(spec: str) -> bool:
    """Whether ``--reward`` names a directory (a reward model; ``reward_model_grader`` says so in
    one line when it is not one) rather than ``module:callable``."""
    from pathlib import Path

    return Path(spec).expanduser().is_dir()


def load_callable(spec: str, *, flag: str) -> Callable[..., Any]:
    """``package.module:function`` (or ``:attribute.path``) → the callable."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{flag} must look like package.module:function, got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{flag}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserError(f"{flag}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{flag}: {spec} is not callable")
    return target


# -- LLM judge -----------------------------------------------------------------------------------
API_KEY_ENV = "AFMKIT_JUDGE_API_KEY"  # the judge's key when --judge-api-key is not given


@dataclasses.dataclass(frozen=True, kw_only=True)
class JudgeSettings:
    """Defaults of the ``--judge-*`` flags (``sxs``, ``safety``) and of ``JudgeClient``: the one source."""

    model: str = "judge"  # model name sent to the judge server
    timeout: float = 120.0  # seconds per judge request


class JudgeClient:
    """A minimal client for any OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(
        self,
        url: str,
        *,
        model: str = JudgeSettings.model,
        timeout: float = JudgeSettings.timeout,
        api_key: str | None = None,
    ) -> None:
        import os

        if not re.match(r"^https?://", url):
            raise UserError(f"--judge-url must start with http:// or https://, got {url!r}")
        base = url.rstrip("/")
        for suffix in ("/chat/completions", "/v1"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        self.url = url
        self.endpoint = base + "/v1/chat/completions"
        self.model = model
        self.timeout = timeout
        self.api_key = api_key or os.environ.get(API_KEY_ENV)

    def _unreachable(self, exc: Exception) -> UserError:
        return UserError(
            f"the judge at {self.url} is unreachable ({type(exc).__name__}: {exc}); start an OpenAI-compatible "
            "server there (e.g. vLLM or llama.cpp's llama-server) or fix --judge-url"
        )

    def check(self) -> None:
        """One tiny chat request before any generation, so that an unreachable judge, a refused
        key or a wrong model name fails in seconds, not after the responses are generated."""
        self.complete([{"role": "user", "content": "Reply with the single word OK."}], max_tokens=4)

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 512) -> str:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens}
        try:
            response = httpx.post(self.endpoint, json=body, headers=headers, timeout=self.timeout)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code in (401, 403):
            key = "no API key was sent" if not self.api_key else "the API key was refused"
            raise UserError(
                f"the judge at {self.endpoint} answered HTTP {response.status_code} ({key}); pass --judge-api-key "
                f"or set {API_KEY_ENV}"
            )
        if response.status_code != 200:
            raise UserError(
                f"the judge at {self.endpoint} answered HTTP {response.status_code}: {response.text[:200]!r}; "
                "check --judge-url and --judge-model"
            )
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(
                f"the judge at {self.endpoint} did not answer in the OpenAI chat-completions format: "
                f"{response.text[:200]!r}"
            ) from None


JUDGE_SYSTEM = (
    "You are an impartial judge comparing two AI assistant responses to the same user prompt. "
    "Judge helpfulness, correctness, harmlessness and how well each follows the prompt's instructions. "
    "Ignore the order in which the responses appear and their length as such."
)

JUDGE_TEMPLATE = """[User prompt]
{prompt}

[Response A]
{first}

[Response B]
{second}

Explain your reasoning briefly, then end with exactly one line of the form
Verdict: <choice>
where <choice> is one of: A much better, A better, A slightly better, A negligibly better, tie, B negligibly better, B slightly better, B better, B much better."""

_VERDICT = re.compile(
    r"verdict\s*:\s*\**\s*(tie|(a|b)\s+(much better|better|slightly better|negligibly better))", re.IGNORECASE
)


def parse_verdict(text: str) -> PairGrade:
    """The last ``Verdict: ...`` line of a judge's answer as a ``PairGrade`` (A = first shown)."""
    matches = list(_VERDICT.finditer(text))
    if not matches:
        return PairGrade(winner="invalid", raw=text)
    match = matches[-1]
    if match.group(1).lower() == "tie":
        return PairGrade(winner="tie", raw=text)
    winner = "first" if match.group(2).lower() == "a" else "second"
    return PairGrade(winner=winner, strength=match.group(3).lower(), raw=text)


@dataclasses.dataclass
class JudgeGrader:
    """An LLM judge behind an OpenAI-compatible API; the first shown response is "A"."""

    client: JudgeClient
    name: str = "llm-judge"

    def grade(self, *, prompt: str, first: str, second: str) -> PairGrade:
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(prompt=prompt, first=first, second=second)},
        ]
        return parse_verdict(self.client.complete(messages))
