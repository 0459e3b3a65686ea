"""Side-by-side grading: both orders graded, position bias cancels, intervals, clear errors."""

import json

import jax
import pytest
from judge_server import shown_responses

import afmkit
from afmkit.config import get_size
from afmkit.errors import UserError
from afmkit.eval import sxs
from afmkit.eval.graders import JudgeClient, JudgeGrader, PairGrade, RewardModelGrader, parse_verdict
from afmkit.model.transformer import init_params

PAIRS = [{"key": str(i), "prompt": f"question {i}", "a": f"GOOD answer {i}", "b": f"weak answer {i}"} for i in range(6)]


def always_first(message):
    return "Both are fine but the first is clearer.\nVerdict: A better"


def prefers_good(message):
    first, second = shown_responses(message)
    if "GOOD" in first and "GOOD" not in second:
        return "Verdict: A much better"
    if "GOOD" in second and "GOOD" not in first:
        return "Verdict: B much better"
    return "Verdict: tie"


def test_both_orders_are_graded_and_a_first_position_bias_cancels(fake_judge, tmp_path):
    judge = fake_judge(always_first)
    grades = sxs.grade_pairs(PAIRS, JudgeGrader(JudgeClient(judge.url)), tmp_path, quiet=True)
    assert len(judge.requests) == 2 * len(PAIRS)
    seen = {shown_responses(r["messages"][-1]["content"]) for r in judge.requests}
    for pair in PAIRS:  # each pair was shown A-first and B-first
        assert (pair["a"], pair["b"]) in seen and (pair["b"], pair["a"]) in seen
    report = sxs.report_from_grades(grades, model_a="m1", model_b="m2", grader="llm-judge")
    assert report["tie"]["rate"] == 100.0 and report["win"]["count"] == report["lose"]["count"] == 0
    assert report["first_position_preferred"] == 100.0
    assert report["order_consistency"] == 0.0


def test_a_judge_that_reads_the_content_gives_a_consistent_winner(fake_judge, tmp_path):
    judge = fake_judge(prefers_good)
    grades = sxs.grade_pairs(PAIRS, JudgeGrader(JudgeClient(judge.url + "/v1")), tmp_path, quiet=True)
    report = sxs.report_from_grades(grades, model_a="m1", model_b="m2", grader="llm-judge")
    assert report["win"]["rate"] == 100.0 and report["order_consistency"] == 100.0
    assert report["first_position_preferred"] == 50.0
    assert report["strengths"]["a"]["much better"] == 12
    low, high = report["win"]["ci95"]
    assert high == 100.0 and 55 < low < 62  # Wilson: 6 of 6 -> [60.97, 100]
    # Grades are resumable: a second pass asks the judge nothing new.
    sxs.grade_pairs(PAIRS, JudgeGrader(JudgeClient(judge.url)), tmp_path, quiet=True)
    assert len(judge.requests) == 12


def test_wilson_interval_known_values():
    assert sxs.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert sxs.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert sxs.wilson_interval(6, 6)[0] == pytest.approx(0.6097, abs=1e-4)


def test_verdict_parsing_takes_the_last_verdict_line():
    assert parse_verdict("Verdict: B slightly better") == PairGrade(
        winner="second", strength="slightly better", raw="Verdict: B slightly better"
    )
    assert parse_verdict("First I thought Verdict: A better.\nVerdict: **tie**").winner == "tie"
    assert parse_verdict("I cannot decide.").winner == "invalid"


def test_reward_model_grader_is_a_pluggable_callable():
    grader = RewardModelGrader(lambda prompt, response: len(response))
    assert grader.grade(prompt="p", first="long answer", second="short").winner == "first"
    assert grader.grade(prompt="p", first="abc", second="abcdef").strength == "much better"
    assert grader.grade(prompt="p", first="same", second="same").winner == "tie"


def test_unreachable_judge_is_a_clear_error():
    client = JudgeClient("http://127.0.0.1:9", timeout=2)
    with pytest.raises(UserError, match=r"judge at http://127.0.0.1:9 is unreachable"):
        client.check()
    with pytest.raises(UserError, match="unreachable"):
        JudgeGrader(client).grade(prompt="p", first="a", second="b")
    with pytest.raises(UserError, match="must start with http"):
        JudgeClient("localhost:8000")


def test_judge_http_error_is_a_clear_error(fake_judge):
    judge = fake_judge(always_first)
    with pytest.raises(UserError, match="HTTP 404"):
        JudgeClient(judge.url + "/wrong/prefix/v2").complete([{"role": "user", "content": "x"}])


def test_judge_key_comes_from_the_flag_or_the_environment_and_a_refusal_names_both(fake_judge, monkeypatch):
    judge = fake_judge(always_first, api_key="sk-right")
    monkeypatch.delenv("AFMKIT_JUDGE_API_KEY", raising=False)
    with pytest.raises(
        UserError, match=r"HTTP 401 \(no API key was sent\); pass --judge-api-key or set AFMKIT_JUDGE_API_KEY"
    ):
        JudgeClient(judge.url).check()
    with pytest.raises(UserError, match=r"HTTP 401 \(the API key was refused\)"):
        JudgeClient(judge.url, api_key="sk-wrong").check()
    JudgeClient(judge.url, api_key="sk-right").check()
    monkeypatch.setenv("AFMKIT_JUDGE_API_KEY", "sk-right")
    JudgeClient(judge.url).check()
    assert len(judge.requests) == 2  # the two accepted checks, one tiny request each
    assert all(r["max_tokens"] <= 4 for r in judge.requests)


def test_the_report_says_how_often_the_longer_answer_won(tmp_path):
    # Four prompts: A (3 or 5 words) against B (4 words). A wins the two where it is longer and one
    # where it is shorter, loses one where it is shorter; a fifth prompt is a tie and is left out.
    pairs = [
        {"key": "1", "prompt": "p", "a": "one two three four five", "b": "one two three four"},
        {"key": "2", "prompt": "p", "a": "one two three four five", "b": "one two three four"},
        {"key": "3", "prompt": "p", "a": "one two three", "b": "one two three four"},
        {"key": "4", "prompt": "p", "a": "one two three", "b": "one two three four"},
        {"key": "5", "prompt": "p", "a": "one two three", "b": "one two three four"},
    ]
    winners = {"1": "a", "2": "a", "3": "a", "4": "b", "5": "tie"}
    grades = [
        {"pair": k, "order": order, "winner": w, "shown_winner": "tie" if w == "tie" else "first"}
        for k, w in winners.items()
        for order in ("ab", "ba")
    ]
    report = sxs.report_from_grades(grades, model_a="m1", model_b="m2", grader="g", pairs=pairs)
    length = report["length"]
    assert length["median_words"] == {"a": 3, "b": 4}
    assert (length["longer_won"], length["decided_unequal"], length["longer_won_rate"]) == (3, 4, 75.0)
    assert length["a_longer"] == {"prompts": 2, "a_won": 2} and length["a_shorter"] == {"prompts": 2, "a_won": 1}
    line = "the longer answer won 3 of 4 decided prompts (75.0%); A won 2 of 2 where its answer was longer"
    assert line in sxs.format_report(report)
    sxs.write_report(tmp_path, report)
    assert "Length: " + line in (tmp_path / "sxs.md").read_text()
    # Without pairs (or when no decided prompt differs in length) the report says nothing of length.
    assert "length" not in sxs.report_from_grades(grades, model_a="m1", model_b="m2", grader="g")
    same = [{**p, "a": p["b"]} for p in pairs]
    assert "longer answer" not in sxs.format_report(
        sxs.report_from_grades(grades, model_a="m1", model_b="m2", grader="g", pairs=same)
    )


def test_when_no_verdict_can_be_parsed_the_report_says_so(fake_judge, tmp_path):
    judge = fake_judge(lambda message: "Both responses have merits.")
    grades = sxs.grade_pairs(PAIRS[:2], JudgeGrader(JudgeClient(judge.url)), tmp_path, quiet=True)
    with pytest.raises(UserError, match=r"none of the 4 verdicts could be parsed .*grades.jsonl"):
        sxs.report_from_grades(grades, model_a="m1", model_b="m2", grader="llm-judge")
    with pytest.raises(UserError, match="no grades yet"):
        sxs.report_from_grades([], model_a="m1", model_b="m2", grader="llm-judge")


@pytest.fixture(scope="module")
def two_tiny_checkpoints(tmp_path_factory, smollm2):
    paths = []
    for seed in (0, 1):
        config = get_size("afm-tiny")
        model = afmkit.LanguageModel(config, init_params(config, jax.random.PRNGKey(seed)), smollm2.tokenizer)
        paths.append(model.save(tmp_path_factory.mktemp(f"tiny{seed}") / "ckpt"))
    return paths


def test_cli_sxs_end_to_end_with_a_fake_judge(two_tiny_checkpoints, fake_judge, tmp_path, capsys):
    from afmkit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in ("cats", "rain", "tea"))
    )
    judge = fake_judge(always_first, api_key="sk-test")
    a, b = (str(p) for p in two_tiny_checkpoints)
    args = ["eval", "sxs", "--a", a, "--b", b, "--prompts", str(prompts), "--grader", "judge"]
    args += ["--judge-url", judge.url, "--judge-api-key", "sk-test"]
    args += ["--max-new-tokens", "8", "--out", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompts"] == 3 and report["judgments"] == 6 and report["tie"]["count"] == 3
    assert report["length"]["decided_unequal"] == 0  # the lengths of the answers the judge saw, all ties
    out = tmp_path / "out"
    assert {
        "pairs.jsonl",
        "grades.jsonl",
        "responses_a.jsonl",
        "responses_b.jsonl",
        "sxs.json",
        "sxs.md",
        "sxs.png",
    } <= {p.name for p in out.iterdir()}
    # One tiny check request before anything was generated, then two judgments per prompt.
    assert len(judge.requests) == 7 and judge.requests[0]["max_tokens"] <= 4


def test_cli_sxs_with_an_unreachable_judge_fails_before_generating(tmp_path, capsys):
    from afmkit.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    args = ["eval", "sxs", "--a", "x", "--b", "y", "--prompts", str(prompts), "--grader", "judge"]
    assert main([*args, "--judge-url", "http://127.0.0.1:9", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("afmkit: error: the judge at http://127.0.0.1:9 is unreachable")
    assert not (tmp_path / "o").exists()


def test_bad_prompt_files_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(UserError, match=r"line 2: 'prompt' must be a str"):
        sxs.load_prompts(path)
    path.write_text('{"prompt": "ok"}\n\n{"prompt": "x"\n')
    with pytest.raises(UserError, match=r"line 3 is not valid JSON"):
        sxs.load_prompts(path)
