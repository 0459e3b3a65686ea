import json

import pytest

from afmkit.data.corpus import iter_text_chunks, read_documents, stdlib_sources
from afmkit.errors import UserError


def test_sources_text_jsonl_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n"
    )
    docs = read_documents([tmp_path])
    assert [d.text for d in docs] == ["first document", "row one", "row two", "second"]
    assert docs[1].source.endswith("rows.jsonl:1")
    assert [d.text for d in read_documents([str(tmp_path / "**" / "*.md")])] == ["second"]


def test_stdlib_is_the_default_corpus():
    files = stdlib_sources()
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_documents([tmp_path / "missing.txt"])
    with pytest.raises(UserError, match="matches no files"):
        read_documents([str(tmp_path / "*.txt")])
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(UserError, match="corpus is empty"):
        read_documents([tmp_path / "blank.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_documents([tmp_path / "bad.jsonl"])


def test_paragraph_split_and_streamed_chunks(tmp_path):
    (tmp_path / "play.txt").write_text("ROMEO:\nBut soft!\n\n\nJULIET:\nAy me!\n  \nNURSE:\nAnon!\n")
    paragraphs = read_documents([tmp_path / "play.txt"], split_paragraphs=True)
    assert [d.text for d in paragraphs] == ["ROMEO:\nBut soft!", "JULIET:\nAy me!", "NURSE:\nAnon!"]
    assert [d.source.rsplit(":", 1)[1] for d in paragraphs] == ["1", "5", "8"]

    big = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "big.txt").write_text(big)
    chunks = list(iter_text_chunks([tmp_path / "big.txt"], chunk_chars=500))
    assert len(chunks) > 10 and all(c.endswith("\n") for c in chunks)
    assert "".join(chunks) == big
