"""``afmkit posttrain synth-if``: verifiable-instruction prompts (AFM's hybrid human + synthetic data).

Each prompt is a human-written task followed by 1 to ``max_constraints`` constraints from the IFEval
instruction families. The constraints come from ``if-verifiable``'s instruction registry: each
checker's own ``build_description`` draws its arguments (from Python's ``random``, seeded per
prompt here, so a seed gives the same file) and writes the sentence; the conflicts table of that
registry keeps incompatible families apart. No IFEval prompt is used: tasks come from the
Self-Instruct seed and user-oriented tasks and the first human turns of hh-rlhf's helpful
dialogues (training data in ``../shared/data``, read at run time, never shipped) or ``--tasks FILE``.

Rows carry IFEval's field names (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``), so
``afmkit.eval.ifeval`` reads and scores them, plus ``id`` (the same value as ``key``),
``task_source``, ``task`` (the task's text alone, which ``posttrain edit-data`` answers) and ``split`` (``train`` or ``dev``: a held-out part for choosing checkpoints;
IFEval itself is only for the final measurement). Dev prompts use tasks no train prompt uses.

Decontamination uses the curation rule (``afmkit.data.curation.decontaminate``: a 13-gram shared
with a benchmark prompt, unless common in the corpus) against IFEval's 541 prompts, the
``eval safety`` prompts and any ``--decontaminate`` file. It checks every task, and every n-gram
that spans a task and its constraints. N-grams wholly inside the constraint sentences are exempt:
those sentences are if-verifiable's templates, the same ones IFEval's authors wrote their prompts
from (the instruction vocabulary the model is meant to learn), not benchmark content; checking them
would remove whole families (title, postscript, lowercase, repeat the request, ...).

``--frame writing`` asks for pieces of writing instead (IFEval's kind of task: essays, letters,
stories, posts): each task that is a short question becomes one of ``WRITING_FRAMES`` around it
("Write a letter to a friend who asked you: ..."), and other tasks are left out. Framing happens
after the train/dev split, which stays the split of the bare tasks: a question held out of an
unframed file of the same seed is held out of the framed one too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from afmkit.errors import UserError

# The built-in task pools: name -> file under the shared data folder (afmkit.files.shared_data_dir).
POOLS = {
    "self-instruct-seed": "sft/self_instruct_seed_tasks.jsonl",
    "self-instruct-user": "sft/self_instruct_user_oriented_instructions.jsonl",
    "hh-rlhf-helpful": "preference/hh-rlhf_helpful-base_test.jsonl",
}
# Tasks outside these bounds are skipped: a greeting is no task, and a long one crowds the context.
MIN_TASK_WORDS = 3
MAX_TASK_WORDS = 200
# The benchmarks every file is decontaminated against, besides --decontaminate files.
SAFETY_PROMPTS = "hh_rlhf/harmless_base_test_prompts.jsonl"  # ``eval safety``'s prompts (packaged)
REPEAT_PROMPT = "combination:repeat_prompt"  # its argument is the request, so it is built last
MAX_ATTEMPTS = 100  # redraws for one prompt (duplicate, contaminated or impossible constraints)
# --frame writing: the kinds of writing a question is framed as; one per question, by a seeded hash.
WRITING_FRAMES = (
    "Write a blog post that answers a reader's question: {q}",
    "Write an essay that responds to this question: {q}",
    "Write a letter to a friend who asked you: {q}",
    "Write an article for a magazine's advice column answering this question: {q}",
    "Write a short speech for a community meeting on this question: {q}",
    'Write a short story in which a character asks "{q}" and finds the answer.',
    "Write a poem inspired by this question: {q}",
    "Write an email to a colleague who asked you: {q}",
)
MAX_QUESTION_WORDS = 40  # a longer question is a situation to answer, not a topic to write on
FRAMES = ("none", "writing")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthIFSettings:
    """Defaults of ``afmkit posttrain synth-if`` and of ``build_prompts``: the one source."""

    seed: int = 0  # the same seed and tasks give the same file
    dev_fraction: float = 0.1  # share of prompts (and of tasks) held out for choosing checkpoints
    tasks: tuple[str, ...] = tuple(POOLS)  # task pools and/or files
    max_constraints: int = 3  # constraints per prompt: 1 to this many
    frame: str = "none"  # "writing": each short question framed as a piece of writing (FRAMES)


@dataclasses.dataclass(frozen=True)
class Task:
    text: str
    source: str  # "hh-rlhf-helpful/17": pool (or file) and row
    pool: str


# -- tasks ---------------------------------------------------------------------------------------
def load_tasks(specs: Sequence[str]) -> tuple[list[Task], dict[str, dict[str, int]]]:
    """Tasks from built-in pools (``POOLS``) and files, deduplicated; and per-pool counts."""
    from afmkit.data.curation.hashing import words

    if not specs:
        raise UserError("--tasks is empty; name a task pool (" + ", ".join(POOLS) + ") or a file")
    seen: set[str] = set()
    tasks: list[Task] = []
    counts: dict[str, dict[str, int]] = {}
    for spec in specs:
        count = counts.setdefault(spec, Counter())
        for text, source in _read_pool(spec):
            count["read"] += 1
            text = text.strip()
            n_words = len(words(text))
            if n_words < MIN_TASK_WORDS:
                count["too_short"] += 1
            elif n_words > MAX_TASK_WORDS:
                count["too_long"] += 1
            elif text in seen:
                count["duplicates"] += 1
            else:
                seen.add(text)
                tasks.append(Task(text, source, spec))
                count["kept"] += 1
    return tasks, {spec: dict(c) for spec, c in counts.items()}


def _read_pool(spec: str) -> Iterator[tuple[str, str]]:
    """(task text, source) for every row of a built-in pool or a task file."""
    from afmkit.files import shared_data_dir

    if spec in POOLS:
        path = shared_data_dir() / POOLS[spec]
        if not path.is_file():
            raise UserError(
                f"task pool {spec!r} needs {path}, which is missing: set AFMKIT_SHARED_DATA to the shared "
                "data folder or pass --tasks FILE (one task per line, or JSONL with a 'prompt' field)"
            )
        rows = _jsonl(path)
        if spec == "hh-rlhf-helpful":
            for line, row in rows:
                yield _first_human_turn(row, path, line), f"{spec}/{line}"
        else:  # Self-Instruct: the instruction plus its first instance's input, when it has one
            for line, row in rows:
                text = row.get("instruction")
                if not isinstance(text, str):
                    raise UserError(f"{path} line {line} has no 'instruction' string")
                instances = row.get("instances") or [{}]
                given = (instances[0] or {}).get("input") or ""
                yield (f"{text}\n\n{given}" if given.strip() else text), f"{spec}/{row.get('id', line)}"
        return
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--tasks {spec}: no such file and not a task pool ({', '.join(POOLS)})")
    if path.suffix in (".jsonl", ".ndjson"):
        for line, row in _jsonl(path):
            text = next(
                (row[k] for k in ("prompt", "task", "instruction", "text") if isinstance(row.get(k), str)), None
            )
            if text is None:
                raise UserError(
                    f"{path} line {line}: no task; give a 'prompt' (or 'task', 'instruction', 'text') string"
                )
            yield text, f"{path.name}/{line}"
    else:
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if text.strip():
                yield text, f"{path.name}/{line}"


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    from afmkit.data.corpus import iter_jsonl_rows

    for line, row in iter_jsonl_rows(path):
        if not isinstance(row, dict):
            raise UserError(f"{path} line {line} is not a JSON object")
        yield line, row


def _first_human_turn(row: dict, path: Path, line: int) -> str:
    transcript = row.get("chosen")
    if not isinstance(transcript, str) or not transcript.lstrip().startswith("Human:"):
        raise UserError(f"{path} line {line}: expected a 'chosen' transcript starting with 'Human:'")
    return transcript.lstrip().removeprefix("Human:").split("\n\nAssistant:", 1)[0]


# -- decontamination -----------------------------------------------------------------------------
def benchmark_decontaminators(extra: Sequence[str] = ()) -> dict[str, Any]:
    """One ``Decontaminator`` (the curation rule, with ``CurationSettings``' sizes) per benchmark."""
    from afmkit.data.curation.decontaminate import Decontaminator, EvalExample, load_eval_set
    from afmkit.data.curation.settings import CurationSettings
    from afmkit.files import packaged_data

    rule = CurationSettings()
    sets = {"ifeval": load_eval_set("ifeval")}
    safety = load_eval_set(packaged_data(SAFETY_PROMPTS))
    sets["safety"] = [EvalExample(f"safety:{i}", e.text) for i, e in enumerate(safety, start=1)]
    for spec in extra:
        sets[str(spec)] = load_eval_set(spec)
    return {
        name: Decontaminator(examples, ngram=rule.ngram, min_ngram=rule.min_ngram, common_count=rule.common_count)
        for name, examples in sets.items()
    }


def decontaminate_tasks(tasks: list[Task], decontaminators: dict[str, Any]) -> tuple[list[Task], list[dict[str, str]]]:
    """The tasks that share no rare n-gram with a benchmark, and a record of each one dropped."""
    from afmkit.data.corpus import Document
    from afmkit.data.curation.pipeline import Removed

    documents = [Document(t.text, t.source) for t in tasks]
    for decontaminator in decontaminators.values():
        decontaminator.corpus_counts.clear()  # counts are of this task pool only
        decontaminator.prepare(documents)  # AFM's exception: n-grams common in the corpus are kept
    kept, dropped = [], []
    for task, document in zip(tasks, documents):
        for name, decontaminator in decontaminators.items():
            result = decontaminator.process(document)
            if isinstance(result, Removed):
                dropped.append({"source": task.source, "pool": task.pool, "benchmark": name, "reason": result.reason})
                break
        else:
            kept.append(task)
    return kept, dropped


def _boundary_contamination(task: str, constraints: str, decontaminators: dict[str, Any], ngram: int) -> str | None:
    """The benchmark whose n-gram spans the task and its constraints, if any (the words each side
    of the boundary that an n-gram across it can reach)."""
    from afmkit.data.corpus import Document
    from afmkit.data.curation.hashing import words
    from afmkit.data.curation.pipeline import Removed

    window = " ".join(words(task)[-(ngram - 1) :] + words(constraints)[: ngram - 1])
    for name, decontaminator in decontaminators.items():
        if isinstance(decontaminator.process(Document(window, "boundary")), Removed):
            return name
    return None


# -- constraints ---------------------------------------------------------------------------------
def instruction_conflicts() -> dict[str, set[str]]:
    """if-verifiable's conflicts table made symmetric (its own ``conflict_make``), on a copy."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, conflict_make

    return conflict_make(copy.deepcopy(INSTRUCTION_CONFLICTS))


@contextlib.contextmanager
def _library_random(seed: str) -> Iterator[None]:
    """The checkers draw their arguments from Python's global ``random``: seed it, restore after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _impossible(chosen: list[tuple[str, dict[str, Any]]]) -> bool:
    """Argument draws the conflicts table does not catch but no response can satisfy."""
    required: set[str] = set()
    forbidden: set[str] = set()
    for iid, kw in chosen:
        if iid == "length_constraints:number_sentences" and kw["relation"] == "less than" and kw["num_sentences"] <= 1:
            return True  # fewer than 1 sentence: an empty response, which always fails
        if iid == "length_constraints:nth_paragraph_first_word" and kw["nth_paragraph"] > kw["num_paragraphs"]:
            return True  # the library may ask for paragraph n+1 of n
        if iid == "keywords:existence":
            required.update(w.lower() for w in kw["keywords"])
        elif iid == "keywords:frequency" and kw["relation"] == "at least":
            required.add(kw["keyword"].lower())
        elif iid == "length_constraints:nth_paragraph_first_word":
            required.add(kw["first_word"].lower())
        elif iid == "keywords:forbidden_words":
            forbidden.update(w.lower() for w in kw["forbidden_words"])
    return bool(required & forbidden)


def draw_constraints(
    rng: random.Random, task: str, *, library_seed: str, max_constraints: int, conflicts: dict[str, set[str]]
) -> tuple[str, list[str], list[dict[str, Any]], str]:
    """(prompt, instruction ids, kwargs, constraint text) for one task.

    ``rng`` picks how many constraints and which families (never two that conflict); each
    checker's ``build_description`` draws its own arguments from the seeded library ``random``.
    """
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    banned: set[str] = set()
    ids: list[str] = []
    for _ in range(rng.randint(1, max_constraints)):
        allowed = [iid for iid in sorted(INSTRUCTION_DICT) if iid not in banned]
        if not allowed:
            break
        ids.append(rng.choice(allowed))
        banned |= conflicts[ids[-1]]
    built: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (sentence, kwargs)
    with _library_random(library_seed):
        for iid in ids:
            if iid == REPEAT_PROMPT:
                continue
            for _ in range(MAX_ATTEMPTS):
                checker = INSTRUCTION_DICT[iid](iid)
                description = checker.build_description()
                kwargs = _plain(checker.get_instruction_args() or {})
                if not _impossible([*((i, k) for i, (_, k) in built.items()), (iid, kwargs)]):
                    break
            else:
                raise RuntimeError(f"could not draw satisfiable arguments for {iid}")
            built[iid] = (description, kwargs)
    constraints = " ".join(built[iid][0] for iid in ids if iid != REPEAT_PROMPT)
    prompt = f"{task}\n\n{constraints}" if constraints else task
    if REPEAT_PROMPT in ids:
        # IFEval's form: the request (task and other constraints), then the instruction to repeat it.
        checker = INSTRUCTION_DICT[REPEAT_PROMPT](REPEAT_PROMPT)
        description = checker.build_description(prompt_to_repeat=prompt)
        built[REPEAT_PROMPT] = (description, {"prompt_to_repeat": prompt})
        constraints = f"{constraints}\n{description}" if constraints else description
        prompt = f"{prompt}\n{description}"
    return prompt, ids, [built[iid][1] for iid in ids], constraints


def _plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    """JSON types (tuples become lists), without the unset arguments."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if v is not None}


# -- the prompt file -----------------------------------------------------------------------------
def split_tasks(tasks: list[Task], *, seed: int, dev_fraction: float) -> dict[str, list[Task]]:
    """Hold out ``dev_fraction`` of the tasks (at least one when there is a fraction to hold out):
    those whose seeded hash of the text is smallest, so adding tasks moves few between splits."""

    def rank(task: Task) -> bytes:
        return hashlib.blake2b(f"synth-if/{seed}/{task.text}".encode(), digest_size=8).digest()

    ranked = sorted(tasks, key=rank)
    n_dev = max(1, round(len(tasks) * dev_fraction)) if dev_fraction > 0 and len(tasks) > 1 else 0
    dev = {id(t) for t in ranked[:n_dev]}
    return {"train": [t for t in tasks if id(t) not in dev], "dev": [t for t in tasks if id(t) in dev]}


def frame_as_writing(tasks: list[Task], *, seed: int) -> list[Task]:
    """The tasks that are one-line questions of at most ``MAX_QUESTION_WORDS`` words, each asked as
    the piece of writing ``WRITING_FRAMES`` assigns it (a seeded hash of the question); the rest go."""
    framed = []
    for task in tasks:
        question = task.text.strip()
        if "\n" in question or not question.endswith("?") or len(question.split()) > MAX_QUESTION_WORDS:
            continue
        pick = hashlib.blake2b(f"synth-if/{seed}/writing/{question}".encode(), digest_size=8).digest()
        text = WRITING_FRAMES[int.from_bytes(pick, "big") % len(WRITING_FRAMES)].format(q=question)
        framed.append(dataclasses.replace(task, text=text))
    return framed


def build_prompts(
    tasks: list[Task],
    n: int,
    *,
    seed: int = SynthIFSettings.seed,
    dev_fraction: float = SynthIFSettings.dev_fraction,
    max_constraints: int = SynthIFSettings.max_constraints,
    frame: str = SynthIFSettings.frame,
    decontaminators: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``n`` prompt rows (train first, then dev) and a report of what was dropped and why.

    Prompt ``i`` of a split depends only on the seed, the split's tasks and ``i`` (not on ``n``),
    so a larger ``n`` extends a file rather than reshuffling it.
    """
    from afmkit.data.curation.settings import CurationSettings

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if not 0 <= dev_fraction < 1:
        raise UserError(f"--dev-fraction must be in [0, 1), got {dev_fraction:g}")
    if max_constraints < 1:
        raise UserError(f"--max-constraints must be at least 1, got {max_constraints}")
    if frame not in FRAMES:
        raise UserError(f"--frame must be one of {', '.join(FRAMES)}, got {frame!r}")
    decontaminators = benchmark_decontaminators() if decontaminators is None else decontaminators
    clean, dropped_tasks = decontaminate_tasks(tasks, decontaminators)
    by_split = split_tasks(clean, seed=seed, dev_fraction=dev_fraction)
    unframed = {split: len(pool) for split, pool in by_split.items()}
    if frame == "writing":  # after the split, so a held-out question stays held out (module docstring)
        by_split = {split: frame_as_writing(pool, seed=seed) for split, pool in by_split.items()}
    tag = "" if frame == "none" else f"{frame}-"
    wanted = {"dev": round(n * dev_fraction)}
    wanted["train"] = n - wanted["dev"]
    for split, count in wanted.items():
        if count and not by_split[split]:
            raise UserError(
                f"no {split} tasks left for {count} {split} prompts ({len(clean)} clean tasks of {len(tasks)}"
                + (f", none of the {unframed[split]} {split} tasks a short question to frame" if tag else "")
                + "); give more tasks (--tasks) or change --dev-fraction"
            )
    conflicts = instruction_conflicts()
    ngram = CurationSettings().ngram
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    boundary = Counter()
    duplicates = 0
    for split in ("train", "dev"):
        pool = by_split[split]
        order: list[Task] = []
        for i in range(wanted[split]):
            if i % len(pool) == 0:  # a fresh shuffle per pass over the tasks: each is used once per pass
                order = random.Random(f"synth-if/{seed}/{tag}{split}/pass{i // len(pool)}").sample(pool, len(pool))
            task = order[i % len(pool)]
            for attempt in range(MAX_ATTEMPTS):
                where = f"synth-if/{seed}/{tag}{split}/{i}/{attempt}"
                prompt, ids, kwargs, constraints = draw_constraints(
                    random.Random(where),
                    task.text,
                    library_seed=where,
                    max_constraints=max_constraints,
                    conflicts=conflicts,
                )
                if prompt in seen:
                    duplicates += 1
                    continue
                benchmark = _boundary_contamination(task.text, constraints, decontaminators, ngram)
                if benchmark is not None:
                    boundary[benchmark] += 1
                    continue
                break
            else:
                raise RuntimeError(f"no usable prompt for task {task.source} after {MAX_ATTEMPTS} draws")
            seen.add(prompt)
            key = f"synth-if-s{seed}-{tag}{split}-{i:06d}"
            rows.append(
                {
                    "id": key,
                    "key": key,
                    "prompt": prompt,
                    "instruction_id_list": ids,
                    "kwargs": kwargs,
                    "task_source": task.source,
                    "task": task.text,
                    "split": split,
                }
            )
    report = {
        "prompts": {s: sum(r["split"] == s for r in rows) for s in ("train", "dev")},
        "tasks": {
            "clean": len(clean),
            "train": len(by_split["train"]),
            "dev": len(by_split["dev"]),
            **({"not_framed": {s: unframed[s] - len(by_split[s]) for s in by_split}} if tag else {}),
            "used": {s: len({r["task_source"] for r in rows if r["split"] == s}) for s in ("train", "dev")},
        },
        "decontamination": {
            "rule": (
                f"{ngram}-gram shared with a benchmark prompt (shorter prompts: their whole text, "
                f">= {CurationSettings().min_ngram} words) and seen fewer than {CurationSettings().common_count} "
                "times in the task pool; n-grams wholly inside if-verifiable's constraint sentences are exempt"
            ),
            "benchmarks": {name: d.benchmark_ngrams for name, d in decontaminators.items()},
            "dropped_tasks": dict(Counter(d["benchmark"] for d in dropped_tasks)),
            "dropped_tasks_by_pool": dict(Counter(d["pool"] for d in dropped_tasks)),
            "dropped_task_examples": dropped_tasks[:20],
            "redrawn_prompts_boundary": dict(boundary),
        },
        "redrawn_duplicates": duplicates,
        "instructions": dict(sorted(Counter(i for r in rows for i in r["instruction_id_list"]).items())),
        "constraints_per_prompt": dict(sorted(Counter(str(len(r["instruction_id_list"])) for r in rows).items())),
    }
    return rows, report


def report_path(out: str | Path) -> Path:
    """The sidecar JSON beside the prompts file: ``prompts.jsonl`` -> ``prompts.report.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.report.json")


def write_prompts(out: str | Path, rows: list[dict[str, Any]], report: dict[str, Any]) -> Path:
    """The prompts file and its sidecar report, each replaced whole (never half-written)."""
    from afmkit.data.curation.command import atomic_file

    out = Path(out)
    with atomic_file(out) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    sidecar = report_path(out)
    with atomic_file(sidecar) as f:
        f.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return sidecar


def read_prompts(path: str | Path, *, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a synth-if file (all, or one split), checked like IFEval's prompts."""
    from afmkit.eval.ifeval import load_prompts
    from afmkit.eval.jsonl import read_jsonl

    load_prompts(path, what="synth-if prompts file")  # fields, kwargs, known instruction ids, unique keys
    rows = read_jsonl(path, what="synth-if prompts file")
    if split is not None:
        if split not in ("train", "dev"):
            raise UserError(f"split must be 'train' or 'dev', got {split!r}")
        rows = [r for r in rows if r.get("split") == split]
        if not rows:
            raise UserError(f"{path} has no {split} prompts")
    return rows


# -- command -------------------------------------------------------------------------------------
def register(recipes: Any) -> None:
    d = SynthIFSettings()
    parser = recipes.add_parser(
        "synth-if", help="verifiable-instruction prompts: a human task plus IFEval-family constraints"
    )
    parser.set_defaults(run=cmd_synth_if)
    parser.add_argument("--out", required=True, help="output JSONL (a .report.json with the counts goes beside it)")
    parser.add_argument("--n", type=int, required=True, help="number of prompts (train and dev together)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    parser.add_argument(
        "--dev-fraction",
        type=float,
        default=d.dev_fraction,
        help=f"share held out as the dev split, on tasks of its own (default {d.dev_fraction:g})",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(d.tasks),
        help="comma-separated task pools (" + ", ".join(POOLS) + ") and/or files: one task per line, "
        "or JSONL with a 'prompt' field (default: the three pools)",
    )
    parser.add_argument(
        "--max-constraints",
        type=int,
        default=d.max_constraints,
        help=f"constraints per prompt: 1 to this many (default {d.max_constraints})",
    )
    parser.add_argument(
        "--frame",
        choices=FRAMES,
        default=d.frame,
        help="writing: ask each short question as a piece of writing (essay, letter, story, ...), "
        f"IFEval's kind of task; other tasks are left out (default {d.frame})",
    )
    parser.add_argument(
        "--decontaminate",
        action="append",
        default=[],
        metavar="FILE",
        help="another benchmark's prompts (JSONL or lines) to decontaminate against; IFEval and the "
        "eval safety prompts always are (repeatable)",
    )


def cmd_synth_if(args: Any) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a .jsonl file path")
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    tasks, pools = load_tasks(specs)
    decontaminators = benchmark_decontaminators(args.decontaminate)
    rows, report = build_prompts(
        tasks,
        args.n,
        seed=args.seed,
        dev_fraction=args.dev_fraction,
        max_constraints=args.max_constraints,
        frame=args.frame,
        decontaminators=decontaminators,
    )
    report = {
        "settings": {
            "n": args.n,
            "seed": args.seed,
            "dev_fraction": args.dev_fraction,
            "max_constraints": args.max_constraints,
            "frame": args.frame,
            "tasks": specs,
        },
        "task_pools": pools,
        **report,
    }
    sidecar = write_prompts(out, rows, report)
    print_report(report, out=out, sidecar=sidecar)
    return 0


def print_report(report: dict[str, Any], *, out: Path, sidecar: Path) -> None:
    p, decon = report["prompts"], report["decontamination"]
    print(f"wrote {p['train'] + p['dev']} prompts to {out}: {p['train']} train, {p['dev']} dev")
    for pool, c in report["task_pools"].items():
        skipped = ", ".join(f"{c.get(k, 0)} {k.replace('_', ' ')}" for k in ("too_short", "too_long", "duplicates"))
        print(f"  tasks from {pool}: {c.get('read', 0)} read, {c.get('kept', 0)} kept ({skipped})")
    dropped = ", ".join(f"{v} by {k}" for k, v in decon["dropped_tasks"].items()) or "none"
    print(f"  decontamination: tasks dropped: {dropped}")
    boundary = ", ".join(f"{v} by {k}" for k, v in decon["redrawn_prompts_boundary"].items()) or "none"
    print(f"  prompts redrawn for an n-gram across task and constraints: {boundary}")
    t = report["tasks"]
    framed = ""
    if "not_framed" in t:
        framed = f" framed ({t['not_framed']['train']} train and {t['not_framed']['dev']} dev not short questions)"
    print(f"  clean tasks: {t['train']} train, {t['dev']} dev{framed}; counts and reasons in {sidecar}")
