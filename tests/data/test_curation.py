import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from afmkit.cli import main
from afmkit.data.corpus import Document, read_documents
from afmkit.data.curation import (
    Decontaminator,
    EvalExample,
    ExactDedup,
    MinHasher,
    NearDedup,
    PiiScrubber,
    curate,
    default_steps,
    load_eval_set,
    lsh_bands,
    luhn_valid,
    quality_steps,
)
from afmkit.data.curation.dedup import candidate_probability

# Clean, ordinary prose: each passes every quality rule and none is a duplicate of another.
CLEAN = [
    "The river town woke slowly that morning. Fishermen pulled their boats onto the gravel while the baker "
    "opened his shutters and set out bread that was still warm. Children ran along the harbour wall, and an "
    "old dog followed them with patient interest. By nine o'clock the market square was full of voices, the "
    "smell of coffee, and the sound of carts rolling over stones that had been laid two centuries earlier.",
    "Photosynthesis converts light energy into chemical energy that plants can store. Inside the chloroplast, "
    "pigments absorb mostly red and blue light and pass that energy to reaction centres. Water molecules are "
    "split, oxygen is released as a by-product, and the captured energy is used to build sugars from carbon "
    "dioxide. This process supports nearly every food chain on the planet and shapes the air we breathe.",
    "When you learn a new language, regular practice matters more than long sessions. Try to read a short "
    "article every day, write a few sentences about your plans, and listen to people speaking at a natural "
    "pace. Mistakes are part of the process, so do not be afraid of them. Over several months the grammar "
    "that once felt strange will start to sound familiar, and conversations will become much easier to follow.",
    "Our committee met on Tuesday to review the budget for the coming year. Most of the discussion focused on "
    "the cost of repairing the library roof and on whether the summer reading programme should be expanded. "
    "After a long debate, members agreed to seek two more quotes from builders and to ask volunteers how many "
    "extra hours they could offer. A final decision will be taken at the next meeting in early spring.",
]
PII_DOC = (
    "Thank you for registering for the spring workshop on community gardening. Sessions run every Saturday "
    "from ten until noon in the hall behind the old school. Please bring gloves and a bottle of water. If "
    "you have questions, contact me at bob@example.com or 555-123-4567; the fee was charged to card "
    "4012 8888 8888 1881 and a receipt will follow by post within a week."
)
SYMBOL_SOUP = " ".join(["#$%^&* ### @@!! ~~~ ...", "{}[]<>|| ;;; ### ...", "%%% ^^^ ***"] * 10)
REPEATED_LINES = "\n".join(["Buy cheap watches online now and save today!"] * 12 + [CLEAN[0]])


def doc(text: str, source: str = "mem.txt") -> Document:
    return Document(text, source)


def removed_by(steps, documents):
    rejects = []
    kept, report = curate(documents, steps, on_reject=rejects.append)
    return kept, report, {r.source: r for r in rejects}


# -- exact and near duplicates --------------------------------------------------------------


def test_exact_duplicates_differing_only_in_case_and_spacing():
    docs = [doc(CLEAN[0], "a"), doc(CLEAN[1], "b"), doc("  " + CLEAN[0].upper().replace(" ", "\n "), "c")]
    kept, report, rejects = removed_by([ExactDedup()], docs)
    assert [d.source for d in kept] == ["a", "b"]
    assert rejects["c"].step == "exact_dedup" and "duplicate of a" in rejects["c"].reason
    assert report.steps[0].removed == 1


def change_words(text: str, positions: list[int]) -> str:
    words = text.split()
    for p in positions:
        words[p] = "zebra" + str(p)
    return " ".join(words)


def test_near_duplicates_with_a_few_words_changed():
    long = " ".join(CLEAN[:3])  # ~200 words
    near = change_words(long, [20, 90, 160])
    docs = [doc(long, "first"), doc(CLEAN[3], "other"), doc(near, "near"), doc(CLEAN[1], "part")]
    kept, _, rejects = removed_by([NearDedup(threshold=0.8)], docs)
    assert [d.source for d in kept] == ["first", "other", "part"]  # the first of the cluster is kept
    assert "near duplicate of first" in rejects["near"].reason


def test_character_shingles_catch_typos():
    typo = CLEAN[2].replace("language", "langauge").replace("practice", "practise")
    docs = [doc(CLEAN[2], "first"), doc(typo, "typo"), doc(CLEAN[3], "other")]
    kept, _, rejects = removed_by([NearDedup(shingle="char", ngram=5)], docs)
    assert [d.source for d in kept] == ["first", "other"] and "near duplicate of first" in rejects["typo"].reason


def shingle_strings(text: str, n: int = 5) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.parametrize("changed", [3, 12, 30])
def test_minhash_estimates_jaccard_like_an_independent_implementation(changed):
    datasketch = pytest.importorskip("datasketch")
    base = " ".join(f"w{i}" for i in range(400))
    other = change_words(base, list(range(5, 400, 400 // changed))[:changed])
    a, b = shingle_strings(base), shingle_strings(other)
    true_jaccard = len(a & b) / len(a | b)
    hasher = MinHasher(num_perm=256, ngram=5)
    ours = float(np.mean(hasher.signature(base) == hasher.signature(other)))
    m1, m2 = datasketch.MinHash(num_perm=256, seed=1), datasketch.MinHash(num_perm=256, seed=1)
    for s in a:
        m1.update(s.encode())
    for s in b:
        m2.update(s.encode())
    theirs = m1.jaccard(m2)
    # Both are unbiased estimators with standard deviation sqrt(J(1-J)/256) <= 0.031.
    assert abs(ours - true_jaccard) < 0.1 and abs(theirs - true_jaccard) < 0.1
    assert abs(ours - theirs) < 0.12


def test_lsh_banding_favours_recall_at_the_threshold():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_bands(threshold=threshold, num_perm=128)
        assert bands * rows <= 128
        assert candidate_probability(threshold, bands=bands, rows=rows) >= 0.99
        assert candidate_probability(threshold - 0.4, bands=bands, rows=rows) < 0.1


def test_near_dedup_removes_close_pairs_and_keeps_distant_ones():
    # 40 unrelated documents, each followed by a variant with a known number of words replaced.
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(5000)]
    docs, truth = [], {}
    for i in range(40):
        base = " ".join(rng.choice(vocabulary, size=300))
        changed = int(rng.integers(0, 16))
        variant = change_words(base, sorted(rng.choice(300, size=changed, replace=False).tolist()))
        a, b = shingle_strings(base), shingle_strings(variant)
        truth[f"v{i}"] = len(a & b) / len(a | b)
        docs += [doc(base, f"b{i}"), doc(variant, f"v{i}")]
    kept, _, rejects = removed_by([NearDedup(threshold=0.8)], docs)
    assert all(f"b{i}" in {d.source for d in kept} for i in range(40))
    close = [k for k, j in truth.items() if j >= 0.9]
    distant = [k for k, j in truth.items() if j <= 0.65]
    assert len(close) >= 5 and len(distant) >= 5
    assert all(k in rejects for k in close) and not any(k in rejects for k in distant)


# -- quality --------------------------------------------------------------------------------


def test_quality_removes_symbol_soup_and_repeated_lines_and_keeps_clean_text():
    docs = [doc(t, f"clean{i}.txt") for i, t in enumerate(CLEAN)]
    docs += [doc(SYMBOL_SOUP, "soup.txt"), doc(REPEATED_LINES, "spam.txt"), doc("Too short.", "short.txt")]
    kept, report, rejects = removed_by(quality_steps(), docs)
    assert [d.text for d in kept] == CLEAN
    assert rejects["soup.txt"].step == "composition"
    assert rejects["spam.txt"].step == "repetition" and "duplicate_line" in rejects["spam.txt"].reason
    assert rejects["short.txt"].step == "length"
    assert [s.removed for s in report.steps] == [1, 1, 1]


def test_code_profile_keeps_real_source_files():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / "json" / "decoder.py", stdlib / "textwrap.py", stdlib / "bisect.py", stdlib / "string.py"]
    docs = [Document(p.read_text(), str(p)) for p in files]
    kept, _, rejects = removed_by(quality_steps(profile="auto"), docs)
    assert len(kept) == len(docs), rejects
    # The prose rules would have dropped them: code is why the profiles exist.
    assert len(curate(docs, quality_steps(profile="prose"))[0]) < len(docs)


# -- PII ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Write to jane.doe+news@mail.example.org today.", "Write to <EMAIL> today.", "EMAIL"),
        ("Card: 4111 1111 1111 1111, exp 12/29.", "Card: <CREDIT_CARD>, exp 12/29.", "CREDIT_CARD"),
        ("Amex 3782-822463-10005 on file", "Amex <CREDIT_CARD> on file", "CREDIT_CARD"),
        ("SSN 123-45-6789.", "SSN <SSN>.", "SSN"),
        ("Call (555) 123-4567 or 555.987.6543!", "Call <PHONE> or <PHONE>!", "PHONE"),
        ("London office: +44 20 7946 0958", "London office: <PHONE>", "PHONE"),
    ],
)
def test_pii_is_replaced_with_tags(text, expected, kind):
    scrubber = PiiScrubber()
    assert scrubber.scrub(text)[0] == expected
    assert scrubber.scrub(text)[1][kind] == expected.count(f"<{kind}>")


@pytest.mark.parametrize(
    "text",
    [
        "Order 4111 1111 1111 1112 shipped",  # 16 digits failing the Luhn check
        "Python 3.12.1 and numpy 1.26.4 released",  # version strings
        "Released on 2024-01-15 at 10:30",  # a date and a time
        "Area 000-12-3456 was never issued",  # not a valid SSN
        "IDs 1234 5678 and 90",
        "result = a @ b.T  # matrix product; @decorator",
        "Server at 192.168.0.1 is up",  # IPv4 is kept unless asked for
    ],
)
def test_things_that_look_like_pii_are_left_alone(text):
    assert PiiScrubber().scrub(text) == (text, {})


def test_luhn_and_optional_ipv4():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert PiiScrubber(ipv4=True).scrub("Server at 192.168.0.1.")[0] == "Server at <IP_ADDRESS>."


# -- decontamination ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ifeval():
    return load_eval_set("ifeval")


def test_ifeval_prompt_inside_a_document_is_caught(ifeval):
    prompt = next(e for e in ifeval if e.name == "ifeval:1001").text
    contaminated = doc(CLEAN[0] + " Here is a task. " + prompt + " " + CLEAN[1], "leak")
    kept, _, rejects = removed_by([Decontaminator(ifeval)], [doc(CLEAN[2], "clean"), contaminated])
    assert [d.source for d in kept] == ["clean"]
    assert "13-gram shared with ifeval:1001" in rejects["leak"].reason


def test_a_common_ngram_does_not_contaminate(ifeval):
    # A 13-word phrase from an IFEval prompt that is common in the training corpus (>= 1000 times),
    # as boilerplate can be, is not evidence of contamination; the same phrase when rare is.
    prompt = next(e for e in ifeval if e.name == "ifeval:1001").text
    phrase = " ".join(prompt.split()[:13])
    boilerplate = [doc(f"Note {i}: {phrase}. Thanks.", f"note{i}") for i in range(1000)]
    story = doc(CLEAN[3] + " " + phrase + ".", "story")
    kept, _, rejects = removed_by([Decontaminator(ifeval)], [*boilerplate, story])
    assert len(kept) == 1001 and not rejects
    kept, _, rejects = removed_by([Decontaminator(ifeval)], [*boilerplate[:998], story])
    assert len(kept) == 0 and "(999 in corpus)" in rejects["story"].reason


def test_short_examples_use_their_own_length(tmp_path):
    evals = tmp_path / "tiny_eval.txt"
    evals.write_text("What is the capital of France\nHi there\n")  # 6 words, then 2 (ignored: < 4)
    examples = load_eval_set(evals)
    assert [e.text for e in examples] == ["What is the capital of France", "Hi there"]
    docs = [doc("Quiz: what is the capital of France? Paris.", "quiz"), doc("Hi there, friend.", "hi")]
    kept, _, rejects = removed_by([Decontaminator(examples)], docs)
    assert [d.source for d in kept] == ["hi"] and rejects["quiz"].reason.startswith("6-gram")


def test_eval_examples_are_named():
    deco = Decontaminator([EvalExample("x:1", "one two three four five")], ngram=13)
    assert deco.benchmark_ngrams == 1


# -- the whole pipeline and the CLI ---------------------------------------------------------


def planted_corpus(tmp_path: Path) -> Path:
    rows = [
        *CLEAN,  # 4 clean documents
        CLEAN[0],  # exact duplicate
        change_words(" ".join(CLEAN[1:4]), [10, 100]),  # near duplicate of the next row
        " ".join(CLEAN[1:4]),
        SYMBOL_SOUP,
        REPEATED_LINES,
        PII_DOC,
        CLEAN[3] + " " + next(e.text for e in load_eval_set("ifeval") if e.name == "ifeval:1005"),
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


def test_clean_text_survives_untouched():
    kept, report = curate([doc(t, f"c{i}.txt") for i, t in enumerate(CLEAN)], default_steps(decontaminate=["ifeval"]))
    assert [d.text for d in kept] == CLEAN
    assert all(s.removed == 0 for s in report.steps)


def test_cli_end_to_end(tmp_path, capsys):
    corpus = planted_corpus(tmp_path)
    out, rejects = tmp_path / "curated.jsonl", tmp_path / "rejects.jsonl"
    args = ["curate", "--data", str(corpus), "--out", str(out), "--rejects", str(rejects), "--decontaminate", "ifeval"]
    assert main([*args, "--json"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed.strip().splitlines()[-1])
    assert "exact_dedup" in printed and "removed" in printed  # the table
    removed = {s["name"]: s["removed"] for s in report["steps"]}
    assert removed == {
        "exact_dedup": 1,
        "length": 0,
        "composition": 1,
        "repetition": 1,
        "near_dedup": 1,
        "decontaminate": 1,
        "pii": 0,
    }
    pii = next(s for s in report["steps"] if s["name"] == "pii")
    assert pii["replacements"] == {"CREDIT_CARD": 1, "EMAIL": 1, "PHONE": 1}
    assert report["documents_in"] == 11 and report["documents_out"] == 6

    docs = read_documents([out])  # what `afmkit pretrain --data` reads
    texts = [d.text for d in docs]
    assert texts[:4] == CLEAN
    assert texts[5] == PII_DOC.replace("bob@example.com", "<EMAIL>").replace("555-123-4567", "<PHONE>").replace(
        "4012 8888 8888 1881", "<CREDIT_CARD>"
    )
    assert all(json.loads(line)["source"].startswith(str(corpus)) for line in out.read_text().splitlines())
    reject_rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert sorted(r["step"] for r in reject_rows) == sorted(k for k, v in removed.items() if v)
    assert all(r["reason"] and r["source"] for r in reject_rows)
    # A rejected document's preview is scrubbed too: the rejects file must not leak PII.
    pii_reject = tmp_path / "pii.jsonl"
    pii_reject.write_text(json.dumps({"text": "Call 555-123-4567 or mail bob@example.com"}) + "\n")
    assert main(["curate", "--data", str(pii_reject), "--out", str(out), "--rejects", str(rejects)]) == 0
    assert json.loads(rejects.read_text())["preview"] == "Call <PHONE> or mail <EMAIL>"
    # Curating a file onto itself is refused.
    capsys.readouterr()
    assert main(["curate", "--data", str(out), "--out", str(out)]) == 2
    assert "is also an input" in capsys.readouterr().err


def test_cli_bad_input_leaves_the_output_alone(tmp_path, capsys):
    out = tmp_path / "curated.jsonl"
    out.write_text("previous result\n")

    def run(*data: str) -> str:
        assert main(["curate", "--data", *data, "--out", str(out)]) == 2
        return capsys.readouterr().err

    assert "does not exist" in run(str(tmp_path / "missing.jsonl"))
    (tmp_path / "blank.txt").write_text("\n \n")
    assert "corpus is empty" in run(str(tmp_path / "blank.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": CLEAN[0]}) + "\n" + json.dumps({"text": CLEAN[1]}) + "\n{broken\n")
    assert "bad.jsonl:3: not valid JSON" in run(str(bad))
    assert main(["curate", "--data", str(tmp_path / "blank.txt"), "--out", str(out), "--decontaminate", "nope"]) == 2
    assert "not a built-in evaluation set" in capsys.readouterr().err
    assert out.read_text() == "previous result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "blank.txt", "curated.jsonl"]  # no temp files
    # A new output path is not created on failure.
    assert main(["curate", "--data", str(bad), "--out", str(tmp_path / "new.jsonl")]) == 2
    assert not (tmp_path / "new.jsonl").exists()
