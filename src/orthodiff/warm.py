"""Run the repository's entry scripts (train.py, eval.py, ...) from a warm interpreter.

Each run is a child process forked from one server process that has already imported torch,
Lightning, diffusers and orthodiff (multiprocessing's forkserver, whose server is
single-threaded, so forking it is safe while the caller runs threads). A run then starts in
under a second instead of the 10-15 s those imports take on two CPU cores (benchmarks/bench_warm.py), which is most of a
short run: the cells of a two-step table and the command-line tests.

The child is the script's own run: the same argv, working directory, environment, exit
status, stdout/stderr (SystemExit's message included) and atexit handlers. Libraries read
some environment variables once, at import (Hugging Face's offline mode and cache paths, for
example), so a run whose environment differs from this process's in anything but the keys in
WARM_ENV starts a fresh interpreter instead. As with every multiprocessing start method but
fork, the caller's main module must be safe to import (the `if __name__ == "__main__":` guard).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # where train.py and eval.py are
PRELOAD = ["orthodiff.app.warm_preload"]  # by name: the server imports it, not this module
WARM_ENV = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "TMPDIR"}  # applied in the child, after the imports

_context = None
_context_lock = threading.Lock()


def context() -> multiprocessing.context.BaseContext:
    global _context
    with _context_lock:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        return _context


def warm_env_differs(env: dict) -> bool:
    """Whether `env` changes anything a library may have read at import time. It is compared
    with this process's environment now, not with the one the warm interpreter imported under:
    this process's own imports set variables of their own (and pytest one per test), so that
    snapshot would send every run to a fresh interpreter. Change such a variable through `env`,
    not in this process, once the warm interpreter runs."""
    keys = (set(env) | set(os.environ)) - WARM_ENV
    return any(env.get(key) != os.environ.get(key) for key in keys)


def run_script(script: str | Path, args: list[str], env: dict | None = None, cwd: str | Path = ROOT,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python script *args` in cwd with env (default: this process's), output captured as
    text; like subprocess.run(..., capture_output=True, text=True), including TimeoutExpired."""
    env = dict(os.environ if env is None else env)
    script, args = str(Path(cwd, script)), [str(arg) for arg in args]
    command = [sys.executable, script, *args]
    if warm_env_differs(env):
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="orthodiff-warm-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        for path in (out, err):  # a child that dies before it opens them leaves them empty
            path.touch()
        child = context().Process(target=_run, args=(script, args, env, str(cwd), str(out), str(err), os.getpid()))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(command, timeout, out.read_text(errors="replace"),
                                            err.read_text(errors="replace"))
        # a negative exit code is the signal that ended it, as with subprocess
        return subprocess.CompletedProcess(command, child.exitcode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


def _run(script: str, args: list[str], env: dict, cwd: str, out: str, err: str, caller: int):
    """In the child: become `python script *args`, for as long as the caller lives."""
    threading.Thread(target=_end_with, args=(caller,), daemon=True).start()
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    sys.path[:0] = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path]
    if "numpy" in sys.modules:  # a fresh interpreter's global RNG is seeded from the OS, not inherited
        sys.modules["numpy"].random.seed()
    if env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends a child with os._exit, which skips them


def _end_with(caller: int, every_s: float = 2.0):
    """End this run when the process that started it is gone. The run is the forkserver's child,
    not the caller's, so killing the caller (a grid's reproduce.py) would otherwise leave it
    training unseen, listed by ps as a forkserver. Checkpoints are written atomically, so
    ending between two writes loses at most the steps since the last."""
    while True:
        time.sleep(every_s)
        try:
            os.kill(caller, 0)
        except ProcessLookupError:
            os._exit(128 + signal.SIGTERM)  # as if SIGTERM had ended it
