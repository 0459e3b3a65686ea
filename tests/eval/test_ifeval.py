"""IFEval: the harness reproduces published GPT-4 numbers; bad input is refused; runs resume."""

import hashlib
import json
import time
from pathlib import Path

import pytest

from afmkit.errors import UserError
from afmkit.eval import ifeval
from afmkit.eval.jsonl import ResultsFile
from afmkit.files import shared_data_dir

DATA = shared_data_dir() / "ifeval"
# The GPT-4 reference responses and google's evaluation output are CI-only data (not shipped).
needs_reference_files = pytest.mark.skipif(
    not (DATA / "eval_results_strict.jsonl").is_file(),
    reason=f"the GPT-4 reference files are not in {DATA} (set AFMKIT_SHARED_DATA to the shared data folder)",
)
GPT4_FIXED = DATA / "input_response_data_gpt4_20231107_145030.fixed.jsonl"
GPT4_UPSTREAM = DATA / "input_response_data_gpt4_20231107_145030.jsonl"
GOOGLE_INPUT_DATA_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
PAPER_GPT4 = {"prompt_strict": 76.89, "inst_strict": 83.57, "prompt_loose": 79.30, "inst_loose": 85.37}
# keywords:letter_frequency with letter "#" (1122) or "!" (1129): the checker draws a random letter.
RANDOM_LETTER_KEYS = {"1122", "1129"}


@pytest.fixture(scope="module")
def prompts():
    return ifeval.load_prompts()


@pytest.fixture(scope="module")
def gpt4_scores(prompts):
    return ifeval.score(prompts, ifeval.read_responses(GPT4_FIXED, prompts))


def test_the_default_prompts_are_googles_541_shipped_with_afmkit(prompts):
    """No ../shared/data and no network: the prompts are package data, byte-identical to
    google-research's input_data.jsonl (sha256 from ../shared/data/SOURCES.md)."""
    import afmkit

    path = ifeval.default_prompts_path()
    assert path.is_relative_to(Path(afmkit.__file__).parent)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GOOGLE_INPUT_DATA_SHA256
    assert len(prompts) == 541 and prompts[0].key == "1000"
    assert (path.parent / "LICENSE").read_text().count("Apache License") >= 1


@needs_reference_files
def test_gpt4_responses_give_the_papers_accuracies(prompts, gpt4_scores):
    assert len(prompts) == 541
    summary = ifeval.summarize(gpt4_scores)
    assert summary["prompts"] == 541 and summary["instructions"] == 834
    for metric, published in PAPER_GPT4.items():
        assert abs(summary[metric] - published) <= 0.5, (metric, summary[metric], published)
    # Reproducible: the verifiers' random draws are seeded.
    again = ifeval.summarize(ifeval.score(prompts, ifeval.read_responses(GPT4_FIXED, prompts)))
    assert again == summary


@needs_reference_files
@pytest.mark.parametrize("mode", ["strict", "loose"])
def test_per_prompt_results_match_googles_evaluation_output(prompts, gpt4_scores, mode):
    """A third party's run of google's evaluation_main (540 prompts): every per-instruction
    verdict agrees except where IFEval itself draws a random letter."""
    key_of = {p.prompt: p.key for p in prompts}
    reference = {}
    for line in (DATA / f"eval_results_{mode}.jsonl").read_text().splitlines():
        row = json.loads(line)
        reference[key_of[row["prompt"]]] = row["follow_instruction_list"]
    ours = {s.key: getattr(s, mode) for s in gpt4_scores}
    assert len(reference) == 540
    differing = {key for key, verdicts in reference.items() if ours[key] != verdicts}
    assert differing <= RANDOM_LETTER_KEYS


@needs_reference_files
def test_upstream_gpt4_file_with_the_known_prompt_mismatch_is_refused_naming_the_line(prompts):
    with pytest.raises(UserError, match=r"line 340: its prompt is not in the prompts file"):
        ifeval.read_responses(GPT4_UPSTREAM, prompts)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_ROW = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


def test_unknown_instruction_id_is_refused_by_name(tmp_path):
    bad = {**GOOD_ROW, "key": 2, "instruction_id_list": ["punctuation:no_comma", "made_up:thing"], "kwargs": [{}, {}]}
    with pytest.raises(UserError, match=r"'made_up:thing' \(keys 2\)"):
        ifeval.load_prompts(_write(tmp_path / "p.jsonl", [GOOD_ROW, bad]))


def test_malformed_and_missing_prompt_files_name_the_problem(tmp_path):
    with pytest.raises(UserError, match=r"line 2 is not valid JSON"):
        ifeval.load_prompts(_write(tmp_path / "p.jsonl", [GOOD_ROW, '{"key": 3, "prompt": ']))
    with pytest.raises(UserError, match=r"line 1 has no 'instruction_id_list'"):
        ifeval.load_prompts(_write(tmp_path / "q.jsonl", [{"key": 1, "prompt": "x"}]))
    with pytest.raises(UserError, match=r"does not exist"):
        ifeval.load_prompts(tmp_path / "missing.jsonl")


def test_empty_response_fails_every_instruction():
    prompt = ifeval.IFEvalPrompt(
        key="1", prompt="Hi", instruction_ids=["punctuation:no_comma", "change_case:english_lowercase"], kwargs=[{}, {}]
    )
    [scored] = ifeval.score([prompt], {"1": "   "})
    assert scored.strict == [False, False] and scored.loose == [False, False]
    [scored] = ifeval.score([prompt], {"1": "all lowercase and no commas"})
    assert scored.strict == [True, True]


def test_a_response_without_language_features_is_scored_without_log_spam(caplog):
    # the verifiers log the whole response as an error when langdetect finds no features: on a
    # looping "****" answer that was thousands of lines per run; the verdict stays IFEval's (followed)
    prompt = ifeval.IFEvalPrompt(
        key="1", prompt="Hi", instruction_ids=["language:response_language"], kwargs=[{"language": "en"}]
    )
    with caplog.at_level("ERROR"):
        [scored] = ifeval.score([prompt], {"1": "****\n\n****"})
    assert scored.strict == [True]
    assert not [r for r in caplog.records if "detect language" in r.getMessage()]


def test_cli_scores_responses_offline_without_input(prompts, tmp_path, capsys, monkeypatch):
    """``--responses`` without ``--input`` scores against the shipped prompts at once: no hub
    lookup (which used to retry for 26 s), no ../shared/data."""
    monkeypatch.setenv("AFMKIT_SHARED_DATA", str(tmp_path / "no-shared-data"))
    from afmkit.cli import main

    responses = tmp_path / "responses.jsonl"
    # An empty response fails every instruction (see test_empty_response_fails_every_instruction).
    rows = [{"prompt": p.prompt, "response": ""} for p in prompts[:3]]
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.perf_counter()
    assert main(["eval", "ifeval", "--responses", str(responses), "--limit", "3", "--json"]) == 0
    assert time.perf_counter() - start < 10
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["prompts"] == 3 and record["prompt_strict"] == 0.0 and record["inst_loose"] == 0.0


@needs_reference_files
def test_cli_scores_ready_made_responses_with_json_last_line_and_reports(tmp_path, capsys):
    from afmkit.cli import main

    assert (
        main(["eval", "ifeval", "--responses", str(GPT4_FIXED), "--limit", "40", "--out", str(tmp_path), "--json"]) == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    record = json.loads(out[-1])
    assert set(PAPER_GPT4) <= set(record) and record["prompts"] == 40
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["prompt_strict"] == record["prompt_strict"]
    assert "keywords:existence" in results["per_instruction"] or results["per_instruction"]
    assert "| prompt-level strict |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "per_instruction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_is_merged_into_the_evaluated_model(tiny_model, tmp_path):
    """``--adapter DIR`` evaluates base + adapter: the same logits as the adapter applied in the
    forward pass; a directory that is not an adapter is refused before the model loads."""
    import jax
    import numpy as np

    from afmkit.adapters.lora import LoraConfig, random_adapter, single
    from afmkit.adapters.peft_io import save_adapter
    from afmkit.cli import main
    from afmkit.eval.cli import apply_adapter
    from afmkit.model.transformer import logits_fn

    adapter = random_adapter(tiny_model.config, LoraConfig(rank=4, targets=("q", "down")), jax.random.PRNGKey(1))
    path = save_adapter(tmp_path / "ad", adapter, config=tiny_model.config, params=tiny_model.params)
    adapted = apply_adapter(tiny_model, str(path))
    ids = tiny_model.tokenizer.encode("Write a haiku about rivers.")
    in_forward = logits_fn(tiny_model.params, np.asarray([ids]), config=tiny_model.config, adapters=single(adapter))
    got = adapted.logits(ids)
    assert not np.allclose(got, tiny_model.logits(ids), atol=1e-3)  # the adapter changes the model
    np.testing.assert_allclose(got, np.asarray(in_forward)[0], atol=1e-4)
    assert main(["eval", "ifeval", "--adapter", str(tmp_path), "--out", str(tmp_path / "o"), "--limit", "1"]) == 2


# -- generation and resuming ---------------------------------------------------------------------
class CountingEngine:
    """Wraps a model's engine; counts prompts and can simulate an interruption after N rows."""

    def __init__(self, engine, stop_after=None):
        self.engine = engine
        self.prompts_seen = 0
        self.stop_after = stop_after
        self.finished = 0

    def stream(self, prompts, sampling, **options):
        self.prompts_seen += len(prompts)
        for event in self.engine.stream(prompts, sampling, **options):
            yield event
            if event.finish_reason:
                self.finished += 1
                if self.stop_after is not None and self.finished >= self.stop_after:
                    raise KeyboardInterrupt


class ModelWithEngine:
    def __init__(self, model, engine):
        self.tokenizer = model.tokenizer
        self.engine = engine
        self.adapter = None


def test_interrupted_run_resumes_with_only_the_missing_prompts(tiny_model, prompts, tmp_path):
    subset = prompts[:7]
    first = CountingEngine(tiny_model.engine, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        ifeval.generate(
            ModelWithEngine(tiny_model, first), subset, tmp_path, max_new_tokens=6, batch_size=2, quiet=True
        )
    path = tmp_path / ifeval.RESPONSES_FILE
    saved = path.read_bytes()
    assert len(saved.splitlines()) == 3
    # A crash in the middle of a write leaves a torn last line: it is dropped and redone.
    path.write_bytes(saved + b'{"key": "torn", "resp')

    second = CountingEngine(tiny_model.engine)
    results, stats = ifeval.generate(
        ModelWithEngine(tiny_model, second), subset, tmp_path, max_new_tokens=6, batch_size=2, quiet=True
    )
    assert second.prompts_seen == 4 and stats["generated"] == 4
    assert path.read_bytes().startswith(saved)  # nothing already written was lost or changed
    assert sorted(r["key"] for r in results) == sorted(p.key for p in subset)
    assert len(path.read_bytes().splitlines()) == 7

    third = CountingEngine(tiny_model.engine)
    ifeval.generate(ModelWithEngine(tiny_model, third), subset, tmp_path, max_new_tokens=6, quiet=True)
    assert third.prompts_seen == 0


def test_piped_generation_logs_progress_lines_counting_from_the_resumed_position(tiny_model, prompts, tmp_path, capsys):
    # A long IFEval run in the background (stderr to a file) must say how far it is.
    subset = prompts[:6]
    ifeval.generate(tiny_model, subset[:2], tmp_path, max_new_tokens=4, batch_size=2, quiet=True)
    capsys.readouterr()
    ifeval.generate(tiny_model, subset, tmp_path, max_new_tokens=4, batch_size=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if "/6 responses" in line]
    assert lines and lines[0].split(": ")[1].startswith("3/6")  # the 2 kept ones count as done
    assert lines[-1].split(": ")[1].startswith("6/6 responses (100%)")


def test_corrupt_line_inside_a_results_file_is_an_error_not_silently_dropped(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text('{"key": "1", "response": "a"}\nnot json\n{"key": "2", "response": "b"}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        ResultsFile(path)
    assert path.read_text().count("\n") == 3  # untouched


def test_resuming_with_another_model_or_other_prompts_is_refused(tiny_model, prompts, tmp_path):
    ifeval.generate(tiny_model, prompts[:2], tmp_path, max_new_tokens=3, quiet=True, run_settings={"model": "m1"})
    before = (tmp_path / ifeval.RESPONSES_FILE).read_bytes()
    with pytest.raises(UserError, match=r"other settings \(model: 'm1' before, 'm2' now\)"):
        ifeval.generate(tiny_model, prompts[:2], tmp_path, max_new_tokens=3, quiet=True, run_settings={"model": "m2"})
    changed = [ifeval.IFEvalPrompt(key=prompts[0].key, prompt="another text", instruction_ids=[], kwargs=[])]
    with pytest.raises(UserError, match=f"key {prompts[0].key} to a different prompt"):
        ifeval.generate(tiny_model, changed, tmp_path, max_new_tokens=3, quiet=True, run_settings={"model": "m1"})
    assert (tmp_path / ifeval.RESPONSES_FILE).read_bytes() == before
