"""Preference pairs for the reward model: (prompt messages, chosen reply, rejected reply, level).

Sources:

* hh-rlhf (Anthropic, MIT; ``../shared/data/preference/*.jsonl``, the helpful-base and
  harmless-base *test* splits): each row is two full transcripts that share the dialogue and
  differ in the final Assistant turn. hh-rlhf's labels are binary, so every pair gets one level
  (default 1, "better", p = 0.85). Rows whose transcripts differ before the final turn (14 of
  4,666), whose replies are identical (2) or empty are dropped and counted.
* several scored responses to one prompt (verifiable rewards, a reward model): every two
  responses with different rewards make a pair whose level comes from the reward gap.

A deterministic held-out test part is chosen by a hash of the prompt, so a prompt's pairs never
straddle the split and the split does not depend on file order.

On disk (``afmkit posttrain reward --data pairs.jsonl``): one JSON object per line,
``{"prompt": [{"role", "content"}, ...], "chosen": str, "rejected": str, "level": 0-3}`` plus
optional ``"source"`` and ``"chosen_grades"`` / ``"rejected_grades"``: ``{grade name: 0-2}`` for
any of ``reward_model.GRADE_NAMES``. ``"prompt"`` may be a string (one user turn) or be named
``"messages"``; ``"level"`` defaults to 1 ("better"). Chosen and rejected must differ.
``load_pair_sources`` reads ``--data``: such files, ``hh-rlhf`` and iTeC run directories.

Tokenization is the project's one chat tokenization (``data.chat.tokenize_conversation``
over ``Tokenizer.apply_chat_template``); each row ends at the reply's end-of-turn token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afmkit.data.chat import tokenize_conversation
from afmkit.errors import UserError
from afmkit.files import shared_data_dir
from afmkit.posttrain.losses import PREFERENCE_LEVEL_PROBS
from afmkit.posttrain.reward_model import GRADE_LEVELS, GRADE_NAMES

Message = dict[str, str]
HH_RLHF_GLOB = "preference/*.jsonl"
HH_RLHF_LEVEL = 1  # "better": hh-rlhf says which reply is preferred, not by how much
DEFAULT_LEVEL = 1  # a JSONL pair without "level": "better", the same reading as hh-rlhf's binary labels
TEST_FRACTION = 0.1
# Reward gaps (on the verifiable reward's 0..1 scale) at or above which a pair is level 0, 1, 2;
# any smaller positive gap is level 3 ("negligibly better"); equal rewards make no pair.
LEVEL_GAPS = (0.75, 0.5, 0.25)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]  # the conversation before the reply, ending with a user turn
    chosen: str
    rejected: str
    level: int  # index into losses.PREFERENCE_LEVEL_PROBS
    source: str = ""
    chosen_grades: dict[str, int] | None = None
    rejected_grades: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": list(self.prompt),
            "chosen": self.chosen,
            "rejected": self.rejected,
            "level": self.level,
        }
        if self.source:
            out["source"] = self.source
        for key in ("chosen_grades", "rejected_grades"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


# -- hh-rlhf ----------------------------------------------------------------------------------
_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_hh_transcript(text: str) -> list[Message]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages (user/assistant), contents stripped."""
    messages: list[Message] = []
    rest = text
    while rest:
        if rest.startswith(_HUMAN):
            role, rest = "user", rest[len(_HUMAN) :]
        elif rest.startswith(_ASSISTANT):
            role, rest = "assistant", rest[len(_ASSISTANT) :]
        else:
            raise ValueError(f"expected a Human: or Assistant: turn at {rest[:40]!r}")
        ends = [i for i in (rest.find(_HUMAN), rest.find(_ASSISTANT)) if i >= 0]
        end = min(ends) if ends else len(rest)
        messages.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    return messages


def hh_rlhf_pairs(
    paths: Iterable[str | os.PathLike] | None = None, *, level: int = HH_RLHF_LEVEL
) -> tuple[list[PreferencePair], dict[str, int]]:
    """Pairs from hh-rlhf JSONL files (default: ``shared_data_dir()/preference/*.jsonl``) and
    counts of what was kept and dropped, by reason."""
    _check_level(level, source="hh-rlhf level")
    if paths is None:
        paths = sorted(shared_data_dir().glob(HH_RLHF_GLOB))
        if not paths:
            raise UserError(
                f"no hh-rlhf files at {shared_data_dir() / HH_RLHF_GLOB}; set AFMKIT_SHARED_DATA to the shared data folder"
            )
    counts = {"kept": 0, "different_dialogue": 0, "identical_replies": 0, "empty_reply": 0, "unparsable": 0}
    pairs = []
    for path in paths:
        path = Path(path)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
            except (ValueError, KeyError, TypeError):
                counts["unparsable"] += 1
                continue
            if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
                counts["unparsable"] += 1
            elif chosen[:-1] != rejected[:-1] or not chosen[:-1]:
                counts["different_dialogue"] += 1
            elif not chosen[-1]["content"] or not rejected[-1]["content"]:
                counts["empty_reply"] += 1
            elif chosen[-1]["content"] == rejected[-1]["content"]:
                counts["identical_replies"] += 1
            else:
                counts["kept"] += 1
                pairs.append(
                    PreferencePair(
                        prompt=tuple(chosen[:-1]),
                        chosen=chosen[-1]["content"],
                        rejected=rejected[-1]["content"],
                        level=level,
                        source=f"{path.name}:{number}",
                    )
                )
    return pairs, counts


def prompt_key(prompt: Sequence[Message]) -> str:
    return hashlib.sha256(json.dumps(list(prompt), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def split_pairs(
    pairs: Sequence[PreferencePair], *, test_fraction: float = TEST_FRACTION
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, test): a pair is held out when its prompt's hash falls in the first
    ``test_fraction`` of the hash range, so the split is deterministic, independent of order,
    and a prompt's pairs are all on one side."""
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"the held-out fraction must be in [0, 1); got {test_fraction}")
    train, test = [], []
    for pair in pairs:
        position = int(prompt_key(pair.prompt)[:12], 16) / 16**12
        (test if position < test_fraction else train).append(pair)
    return train, test


# -- pairs from scored responses --------------------------------------------------------------
def level_from_gap(gap: float, level_gaps: Sequence[float] = LEVEL_GAPS) -> int:
    """The preference level of a pair whose rewards differ by ``gap`` > 0."""
    for level, threshold in enumerate(level_gaps):
        if gap >= threshold:
            return level
    return len(PREFERENCE_LEVEL_PROBS) - 1


def pairs_from_scored(
    prompt: Sequence[Message],
    responses: Sequence[str],
    rewards: Sequence[float],
    *,
    level_gaps: Sequence[float] = LEVEL_GAPS,
    source: str = "",
) -> list[PreferencePair]:
    """Every two distinct responses to ``prompt`` with different rewards, the higher one chosen,
    the level from the gap (``level_from_gap``). Equal rewards say nothing and make no pair."""
    if len(responses) != len(rewards):
        raise UserError(f"{len(responses)} responses but {len(rewards)} rewards; give one reward per response")
    if len(level_gaps) != len(PREFERENCE_LEVEL_PROBS) - 1 or list(level_gaps) != sorted(level_gaps, reverse=True):
        raise UserError(f"level gaps must be {len(PREFERENCE_LEVEL_PROBS) - 1} decreasing thresholds; got {level_gaps}")
    unique: dict[str, float] = {}
    for response, reward in zip(responses, rewards):
        if not np.isfinite(reward):
            raise UserError(f"reward {reward} of a response is not a finite number")
        unique.setdefault(response, float(reward))  # the same text twice is one response
    items = list(unique.items())
    pairs = []
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (a, ra), (b, rb) = items[i], items[j]
            if ra == rb:
                continue
            (chosen, high), (rejected, low) = ((a, ra), (b, rb)) if ra > rb else ((b, rb), (a, ra))
            pairs.append(
                PreferencePair(
                    prompt=tuple(prompt),
                    chosen=chosen,
                    rejected=rejected,
                    level=level_from_gap(high - low, level_gaps),
                    source=source,
                )
            )
    return pairs


def itec_pairs(
    run_dir: str | os.PathLike, *, reward: str = "strict", level_gaps: Sequence[float] = LEVEL_GAPS
) -> list[PreferencePair]:
    """Pairs from an iTeC run (``afmkit posttrain itec --out RUN``): every round's
    ``samples.jsonl`` grouped by prompt, the K responses paired by their verifiable ``reward``
    (``pairs_from_scored``); the prompt texts come from the prompts file the run recorded in
    ``itec.json``. Responses that ran to the token limit are kept: the reward already judged
    them. Source: ``RUN/round-NN:prompt id``."""
    from afmkit.posttrain.itec import STATE_FILE

    run_dir = Path(run_dir)
    state = run_dir / STATE_FILE
    try:
        prompts_path = Path(json.loads(state.read_text())["settings"]["prompts"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{run_dir} is not an iTeC run (no readable {STATE_FILE}); give the directory of 'posttrain itec --out'"
        ) from None
    if not prompts_path.is_file():
        raise UserError(
            f"{state} names the prompts file {prompts_path}, which does not exist; restore it to pair the samples"
        )
    texts = {}
    for line in prompts_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts[str(row.get("id", row.get("key")))] = row["prompt"]
    rounds = sorted(run_dir.glob("round-*/samples.jsonl"))
    if not rounds:
        raise UserError(f"{run_dir} has no round-NN/samples.jsonl yet; run at least one iTeC round first")
    pairs: list[PreferencePair] = []
    for path in rounds:
        by_prompt: dict[str, list[tuple[str, float]]] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                by_prompt.setdefault(str(row["prompt_id"]), []).append((row["text"], float(row["rewards"][reward])))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{number}: not an iTeC sample with a {reward!r} reward") from None
        for prompt_id, scored in by_prompt.items():
            if prompt_id not in texts:
                raise UserError(
                    f"{path}: prompt {prompt_id!r} is not in {prompts_path}; the run's prompts file changed"
                )
            pairs += pairs_from_scored(
                [{"role": "user", "content": texts[prompt_id]}],
                [text for text, _ in scored],
                [value for _, value in scored],
                level_gaps=level_gaps,
                source=f"{run_dir.name}/{path.parent.name}:{prompt_id}",
            )
    return pairs


HH_RLHF_SOURCE = "hh-rlhf"  # the --data name of the shared hh-rlhf dialogues


def load_pair_sources(spec: str) -> list[PreferencePair]:
    """Pairs from ``--data``: comma-separated sources, each a pairs JSONL file
    (``read_pairs_jsonl``), ``hh-rlhf`` (``hh_rlhf_pairs``) or an iTeC run directory
    (``itec_pairs``)."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError("--data is empty; give pairs JSONL files, 'hh-rlhf' or iTeC run directories")
    pairs: list[PreferencePair] = []
    for name in names:
        if name == HH_RLHF_SOURCE:
            pairs += hh_rlhf_pairs()[0]
        elif Path(name).is_dir():
            pairs += itec_pairs(name)
        else:
            pairs += read_pairs_jsonl(name)
    return pairs


# -- JSONL ------------------------------------------------------------------------------------
def write_pairs_jsonl(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_pairs_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    """Pairs from ``path`` (format in the module docstring); errors name the bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"preference data {path} does not exist; give a JSONL file of prompt/chosen/rejected/level lines"
        )
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            prompt = row["prompt"] if "prompt" in row else row["messages"]
            chosen, rejected, level = row["chosen"], row["rejected"], row.get("level", DEFAULT_LEVEL)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{where}: expected a JSON object with prompt (or messages), chosen and rejected") from None
        if isinstance(prompt, str) and prompt:
            prompt = [{"role": "user", "content": prompt}]
        if (
            not isinstance(prompt, list)
            or not prompt
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt
            )
        ):
            raise UserError(f"{where}: 'prompt' must be a non-empty string or list of {{'role': str, 'content': str}}")
        if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen or not rejected:
            raise UserError(f"{where}: 'chosen' and 'rejected' must be non-empty strings")
        if chosen == rejected:
            raise UserError(f"{where}: 'chosen' and 'rejected' are the same text, which says nothing; drop the line")
        _check_level(level, source=f"{where}: level")
        grades = {
            key: _read_grades(row.get(key), where=f"{where}: {key}") for key in ("chosen_grades", "rejected_grades")
        }
        pairs.append(
            PreferencePair(
                prompt=tuple({"role": m["role"], "content": m["content"]} for m in prompt),
                chosen=chosen,
                rejected=rejected,
                level=level,
                source=str(row.get("source", where)),
                **grades,
            )
        )
    if not pairs:
        raise UserError(f"{path} holds no preference pairs")
    return pairs


def _check_level(level: Any, *, source: str) -> None:
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < len(PREFERENCE_LEVEL_PROBS):
        raise UserError(
            f"{source} {level!r} is not a preference level; use 0 (significantly better), 1 (better), "
            "2 (slightly better) or 3 (negligibly better)"
        )


def _read_grades(value: Any, *, where: str) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"{where} must be an object of grade name -> 0..{GRADE_LEVELS - 1}")
    for name, grade in value.items():
        if name not in GRADE_NAMES:
            raise UserError(f"{where}: unknown grade {name!r}; the grades are {', '.join(GRADE_NAMES)}")
        if not isinstance(grade, int) or isinstance(grade, bool) or not 0 <= grade < GRADE_LEVELS:
            raise UserError(f"{where}: grade {name} = {grade!r}; use an integer 0..{GRADE_LEVELS - 1}")
    return dict(value)


# -- tokenization and batches -----------------------------------------------------------------
def conversation_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a conversation ending with an assistant reply, through the reply's
    end-of-turn token (ChatML's ``<|im_end|>``) and not what the template adds after it, so a
    reply scored here and a generated one (which stops at that token) end alike."""
    if not messages or messages[-1]["role"] != "assistant":
        raise UserError("a scored conversation must end with the assistant's reply")
    example = tokenize_conversation(tokenizer, messages)
    stops = set(tokenizer.stop_ids)
    last = len(example.ids)
    for i in range(len(example.ids) - 1, -1, -1):
        if example.mask[i] and example.ids[i] in stops:
            last = i + 1
            break
    return example.ids[:last]


def pad_rows(rows: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``tokens [N, length]`` and ``segment_ids`` (1 on tokens, 0 on padding)."""
    length = length or max((len(r) for r in rows), default=1)
    tokens = np.zeros((len(rows), length), np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row of {len(row)} tokens is longer than {length}")
        tokens[i, : len(row)] = row
        segment_ids[i, : len(row)] = 1
    return tokens, segment_ids


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    chosen: list[int]
    rejected: list[int]
    level: int
    chosen_grades: np.ndarray  # [H] labels (0 where absent)
    rejected_grades: np.ndarray
    chosen_grade_mask: np.ndarray  # [H] 1 where the grade is given
    rejected_grade_mask: np.ndarray


def _grade_arrays(grades: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros(len(GRADE_NAMES), np.int32)
    mask = np.zeros(len(GRADE_NAMES), np.float32)
    for name, value in (grades or {}).items():
        labels[GRADE_NAMES.index(name)] = value
        mask[GRADE_NAMES.index(name)] = 1.0
    return labels, mask


def tokenize_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], *, max_len: int) -> tuple[list[TokenizedPair], int]:
    """Both conversations of each pair as token ids; pairs where either is longer than
    ``max_len`` are dropped (truncating would cut the token the score is read at). Returns the
    tokenized pairs and how many were dropped."""
    out, dropped = [], 0
    for pair in pairs:
        chosen = conversation_ids(tokenizer, [*pair.prompt, {"role": "assistant", "content": pair.chosen}])
        rejected = conversation_ids(tokenizer, [*pair.prompt, {"role": "assistant", "content": pair.rejected}])
        if max(len(chosen), len(rejected)) > max_len:
            dropped += 1
            continue
        chosen_labels, chosen_mask = _grade_arrays(pair.chosen_grades)
        rejected_labels, rejected_mask = _grade_arrays(pair.rejected_grades)
        out.append(
            TokenizedPair(chosen, rejected, pair.level, chosen_labels, rejected_labels, chosen_mask, rejected_mask)
        )
    return out, dropped


def pair_batch(pairs: Sequence[TokenizedPair], *, rows: int, length: int) -> dict[str, np.ndarray]:
    """A fixed-shape batch of ``rows`` pairs (fewer pairs: padding pairs with ``pair_mask`` 0), in
    the fields of ``train.objectives.PairBatch``: ``chosen_tokens``/``rejected_tokens [rows,
    length]`` right-padded, ``chosen_lengths``/``rejected_lengths [rows]``, ``level``,
    ``pair_mask [rows]``, ``chosen_grades``/``rejected_grades [rows, H]`` (labels) and
    ``chosen_grade_mask``/``rejected_grade_mask [rows, H]`` (1 where the grade is given)."""
    if len(pairs) > rows:
        raise ValueError(f"{len(pairs)} pairs do not fit a batch of {rows}")
    padding = rows - len(pairs)
    h = len(GRADE_NAMES)
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        token_rows = [getattr(p, side) for p in pairs] + [[]] * padding
        tokens, segment_ids = pad_rows(token_rows, length)
        out[f"{side}_tokens"] = tokens
        out[f"{side}_lengths"] = segment_ids.sum(axis=1).astype(np.int32)
        grades = np.zeros((rows, h), np.int32)
        mask = np.zeros((rows, h), np.float32)
        for i, p in enumerate(pairs):
            grades[i], mask[i] = getattr(p, f"{side}_grades"), getattr(p, f"{side}_grade_mask")
        out[f"{side}_grades"], out[f"{side}_grade_mask"] = grades, mask
    out["level"] = np.array([p.level for p in pairs] + [0] * padding, np.int32)
    out["pair_mask"] = np.array([1.0] * len(pairs) + [0.0] * padding, np.float32)
    return out
