"""The examples fail clearly when the data they need is absent."""

import subprocess
import sys
from pathlib import Path

MAKE_DATA = Path(__file__).parents[1] / "examples" / "summarize" / "make_data.py"


def test_summarize_make_data_without_lima_says_why_in_one_line(tmp_path):
    env = {"AFMKIT_SHARED_DATA": str(tmp_path / "absent"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, str(MAKE_DATA), "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert str(tmp_path / "absent" / "sft" / "lima_llamafactory.json") in run.stderr
    assert "non-commercial" in run.stderr and "AFMKIT_SHARED_DATA" in run.stderr
    assert not (tmp_path / "out").exists()
