"""On a fatal signal, print the native stack of the crashing thread before faulthandler prints the
Python stacks: a segfault inside XLA or one of our kernels otherwise shows only the Python line
that called it. The lines read ``library(+offset)``; symbolize them with the same wheel, e.g.
``addr2line -f -C -e .../jaxlib/libjax_common.so 0xOFFSET`` (it keeps its symbol table).

Built with the system's C compiler; without one, nothing is installed."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

_library = None

SOURCE = r"""
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static struct sigaction previous[65];
static char note[256];

static void print_native_stack(int sig) {
  static const char header[] = "\nnative stack of the crashing thread (tests/native_backtrace.py):\n";
  void* frames[96];
  (void)!write(2, header, sizeof header - 1);
  (void)!write(2, note, strlen(note));
  backtrace_symbols_fd(frames, backtrace(frames, 96), 2);
  /* Hand the signal to the handler that was there before (faulthandler's): it prints the Python
     stacks and ends the process. The signal is blocked in this handler, so it arrives on return. */
  sigaction(sig, &previous[sig], NULL);
  raise(sig);
}

int install(const char* versions) {
  strncpy(note, versions, sizeof note - 2);
  strcat(note, "\n");
  void* warm[1];
  backtrace(warm, 1); /* loads libgcc_s now, not inside the handler */
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = print_native_stack;
  action.sa_flags = SA_ONSTACK; /* faulthandler's alternate stack, so a stack overflow prints too */
  sigemptyset(&action.sa_mask);
  const int signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
  for (unsigned i = 0; i < sizeof signals / sizeof signals[0]; ++i)
    if (sigaction(signals[i], &action, &previous[signals[i]]) != 0) return -1;
  return 0;
}
"""


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def install() -> bool:
    """Install the handler in this process (after faulthandler's, which it chains to). Returns
    whether it is installed. The report names the jaxlib it ran, to symbolize with the same one."""
    import jaxlib

    cc = compiler()
    if cc is None:
        return False
    folder = Path(tempfile.mkdtemp(prefix="afmkit-native-backtrace-"))
    (folder / "native_backtrace.c").write_text(SOURCE)
    library = folder / "native_backtrace.so"
    built = subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(library), str(folder / "native_backtrace.c")],
        capture_output=True,
    )
    if built.returncode != 0:
        return False
    global _library
    _library = ctypes.CDLL(str(library))  # kept: the handler's code stays mapped while the process lives
    shutil.rmtree(folder)  # the mapping outlives the file
    return _library.install(f"jaxlib {jaxlib.__version__} at {Path(jaxlib.__file__).parent}".encode()) == 0
