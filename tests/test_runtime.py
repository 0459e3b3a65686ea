"""Process-wide settings: training commands restart with glibc settings that keep freed memory;
the others give large freed blocks back to the OS (``AFMKIT_MALLOC=default`` keeps glibc's defaults)."""

import os
import subprocess
import sys
import textwrap

import pytest

from afmkit import cli, runtime

# Prints the variable, restarts once, then mallocs, touches and frees 256 MiB, and prints the
# minor page faults of doing it a second time (each line tagged with the process id). Plain
# malloc: numpy asks for huge pages on large arrays, which would hide the faults.
CHILD = textwrap.dedent(
    """
    import ctypes, os, resource
    from afmkit.runtime import restart_keeping_freed_memory
    print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
    restart_keeping_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 1 << 28
    block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size); ctypes.memset(block, 1, size)
    print(os.getpid(), "faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
    """
)
PAGES = (1 << 28) // 4096


def _glibc() -> bool:
    try:
        return sys.platform == "linux" and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # musl and others do not know the name
        return False


linux_glibc = pytest.mark.skipif(not _glibc(), reason="glibc's tunables are Linux/glibc only")


def run_child(**env):
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "AFMKIT_MALLOC")}
    result = subprocess.run(
        [sys.executable, "-c", CHILD], env={**environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [line.split(" ", 1) for line in result.stdout.splitlines()]


@linux_glibc
def test_the_restarted_process_reuses_freed_memory_without_page_faults():
    (pid, before), (pid_again, after), (_, faults) = run_child()
    assert pid == pid_again  # exec keeps the process: a caller waiting on it sees one process
    assert before == ""
    assert after == runtime.KEEP_FREED_MEMORY
    # Each of the 65,536 pages would fault again if the freed block went back to the OS.
    assert int(faults.split()[1]) < PAGES // 20


@linux_glibc
@pytest.mark.parametrize(
    "env", [{"AFMKIT_MALLOC": "default"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}], ids=["opt-out", "user-set"]
)
def test_no_restart_when_the_user_chose_malloc_settings(env):
    lines = run_child(**env)
    assert len(lines) == 2  # no second start
    assert lines[0][1] == env.get("GLIBC_TUNABLES", "")


# Frees one 3 MiB block (glibc's default threshold then rises past 3 MiB), mallocs and touches 64
# more with a live 768 KiB block after each (as XLA's buffers sit between other allocations; too
# large for the holes that importing afmkit leaves, so it lands after its block), frees the 64 and
# prints how many MiB RSS fell by.
RETURN_CHILD = textwrap.dedent(
    """
    import ctypes
    from afmkit.runtime import return_freed_memory
    def rss_mib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) / 1024
    print(return_freed_memory())
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 3 << 20
    libc.free(libc.malloc(size))
    blocks, pins = [], []
    for _ in range(64):
        blocks.append(libc.malloc(size))
        ctypes.memset(blocks[-1], 1, size)
        pins.append(libc.malloc(768 << 10))
    before = rss_mib()
    for block in blocks:
        libc.free(block)
    print(before - rss_mib())
    """
)


@linux_glibc
@pytest.mark.parametrize(
    "env, returned", [({}, True), ({"AFMKIT_MALLOC": "default"}, False)], ids=["afmkit", "glibc-default"]
)
def test_commands_that_do_not_train_give_freed_blocks_back_unless_told_not_to(env, returned):
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "AFMKIT_MALLOC")}
    environ = {k: v for k, v in environ.items() if not (k.startswith("MALLOC_") and k.endswith("_"))}
    result = subprocess.run(
        [sys.executable, "-c", RETURN_CHILD], env={**environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    was_set, fell_mib = result.stdout.split()
    assert was_set == str(returned)
    if returned:  # 192 MiB freed, all of it mmapped: back to the OS
        assert float(fell_mib) > 180
    else:  # glibc's default keeps them in the heap, pinned between the live blocks
        assert float(fell_mib) < 12


@linux_glibc
@pytest.mark.parametrize(
    "env",
    [{"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}],
    ids=["tunables", "malloc-variable"],
)
def test_malloc_settings_the_user_chose_are_left_alone(monkeypatch, env):
    monkeypatch.delenv("AFMKIT_MALLOC", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runtime.return_freed_memory() is False


@linux_glibc
def test_a_failed_restart_leaves_the_process_and_its_environment_as_they_were(monkeypatch):
    def no_interpreter(*_):
        raise FileNotFoundError("no interpreter")

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("AFMKIT_MALLOC", raising=False)
    monkeypatch.setattr(os, "execv", no_interpreter)
    runtime.restart_keeping_freed_memory()  # carries on with glibc's defaults
    assert "GLIBC_TUNABLES" not in os.environ


@pytest.mark.parametrize(
    "argv, restarts",
    [
        (["posttrain", "sft", "--data", "x.jsonl", "--out", "y"], True),
        (["adapter", "train", "--data", "x.jsonl", "--out", "y"], True),
        (["compress", "recover", "--model", "m", "--data", "x.txt"], True),
        (["info", "afm-on-device"], False),
        (["posttrain", "synth-if", "--out", "p.jsonl", "--n", "4"], False),
    ],
)
def test_only_training_commands_restart_and_only_from_the_command_line(monkeypatch, argv, restarts):
    class Restarted(Exception):
        pass

    def restart():
        raise Restarted

    real_parser = cli.build_parser

    def parser_that_does_not_run():
        parser = real_parser()
        parse = parser.parse_args

        def parse_args(args=None):
            namespace = parse(args)
            namespace.run = lambda _: 0
            return namespace

        parser.parse_args = parse_args
        return parser

    returned = []
    monkeypatch.setattr(runtime, "restart_keeping_freed_memory", restart)
    monkeypatch.setattr(runtime, "return_freed_memory", lambda: returned.append(True))
    monkeypatch.setattr(cli, "build_parser", parser_that_does_not_run)
    monkeypatch.setattr(sys, "argv", ["afmkit", *argv])
    if restarts:
        with pytest.raises(Restarted):
            cli.main()
    else:
        assert cli.main() == 0
        assert returned == [True]  # the others may give large freed blocks back instead
    assert cli.main(argv) == 0  # an explicit argv (a caller in Python, a test) changes neither
    assert len(returned) == (0 if restarts else 1)


@pytest.mark.parametrize("off, kept", [("1", False), (None, True)], ids=["off", "on"])
def test_compiled_programs_are_kept_under_the_cache_directory_unless_switched_off(tmp_path, off, kept):
    environ = {k: v for k, v in os.environ.items() if k not in ("AFMKIT_NO_XLA_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    if off:
        environ["AFMKIT_NO_XLA_CACHE"] = off
    child = "import jax; from afmkit import runtime; runtime.enable_compilation_cache(); print(jax.config.jax_compilation_cache_dir)"
    result = subprocess.run(
        [sys.executable, "-c", child],
        env={**environ, "AFMKIT_CACHE": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (str(tmp_path / "xla") if kept else "None")
