"""The run-directory rules every post-training recipe shares: a non-empty --out needs --resume, and
a resumed run must repeat the settings its record holds; every refusal is one line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from afmkit.errors import UserError
from afmkit.train.run_directory import check_run_directory, run_identity, write_json


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    rank: int = 4
    targets: tuple[str, ...] = ("q", "v")
    steps: int = 10
    resume: bool = False


def test_identity_leaves_out_resume_and_what_may_change_and_holds_tuples_as_lists():
    identity = run_identity(Settings(), ("steps",), model="m")
    assert identity == {"rank": 4, "targets": ["q", "v"], "model": "m"}
    assert json.loads(json.dumps(identity)) == identity  # what a record reads back compares equal


def test_a_new_run_needs_an_empty_or_new_directory(tmp_path):
    out = tmp_path / "run"
    check_run_directory(out, out / "run.json", {}, resume=False, run="test")
    out.mkdir()
    check_run_directory(out, out / "run.json", {}, resume=False, run="test")
    (out / "file").write_text("x")
    with pytest.raises(UserError, match="is not empty; choose a new --out, or pass --resume"):
        check_run_directory(out, out / "run.json", {}, resume=False, run="test")


@pytest.mark.parametrize("key", [None, "settings"])
def test_a_resumed_run_must_repeat_its_recorded_settings(tmp_path, key):
    out = tmp_path / "run"
    record = out / "training" / "settings.json"
    identity = run_identity(Settings(), ("steps",))

    def check(settings):
        check_run_directory(out, record, run_identity(settings, ("steps",)), resume=True, run="test", key=key)

    with pytest.raises(UserError, match=r"holds no test run \(training/settings.json\)"):
        check(Settings())
    write_json(record, identity if key is None else {key: identity, "table": []})
    check(Settings(steps=99))  # may change on resume
    with pytest.raises(UserError, match=r"the settings differ .*rank: saved 4, now 8"):
        check(Settings(rank=8))
    record.write_text("{not json")
    with pytest.raises(UserError, match="it is damaged"):
        check(Settings())


def test_a_record_from_before_a_setting_existed_resumes_only_at_that_settings_default(tmp_path):
    """A run begun before ``rank`` was a setting: its record lacks it. Resuming at the default
    (the old behaviour, by the rule for new settings) is allowed; another value is refused."""
    out = tmp_path / "run"
    record = out / "settings.json"
    old = run_identity(Settings(), ("steps",))
    del old["rank"]
    write_json(record, old)
    check_run_directory(out, record, run_identity(Settings(), ("steps",)), resume=True, run="test")
    with pytest.raises(UserError, match=r"rank: saved None, now 8"):
        check_run_directory(out, record, run_identity(Settings(rank=8), ("steps",)), resume=True, run="test")
    # Inputs beside the settings have no default: one the record lacks is a difference.
    with pytest.raises(UserError, match=r"model: saved None, now 'm'"):
        check_run_directory(out, record, run_identity(Settings(), ("steps",), model="m"), resume=True, run="test")
