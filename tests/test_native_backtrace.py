"""The suite's crash report (tests/native_backtrace.py): a segfault prints the native stack, then
faulthandler's Python stack, and the process still dies of the signal."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from native_backtrace import compiler

CRASH = """
import ctypes, faulthandler, sys
sys.path.insert(0, {tests!r})
faulthandler.enable()
import native_backtrace
assert native_backtrace.install()
ctypes.string_at(0)
"""


@pytest.mark.skipif(compiler() is None, reason="no C compiler")
def test_a_segfault_reports_the_native_stack_then_the_python_stack():
    child = subprocess.run(
        [sys.executable, "-c", CRASH.format(tests=str(Path(__file__).parent))], capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGSEGV
    native = child.stderr.index("native stack of the crashing thread")
    python = child.stderr.index("Fatal Python error: Segmentation fault")
    assert native < python
    assert "string_at" in child.stderr[python:]  # faulthandler still names the Python line
    assert "libc.so" in child.stderr[native:python]  # and the native frames came first
