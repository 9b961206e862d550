"""orthodiff.app.warm: a script run from the warm interpreter behaves as `python script` does."""

import os
import signal
import subprocess
import sys
import time

import pytest

from orthodiff.warm import run_script

SCRIPT = """
import atexit, os, sys, tempfile
import torch
print("argv", sys.argv[1:], "cwd", os.getcwd(), "threads", torch.get_num_threads(), "tmp", tempfile.gettempdir())
print("preloaded", "pytorch_lightning" in sys.modules, "on stderr", file=sys.stderr)
if sys.argv[1] == "refuse":
    raise SystemExit("script.py: a one-line refusal")
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[1] == "sleep":
    import time; time.sleep(60)
if sys.argv[1] == "pidfile":
    import pathlib, time; pathlib.Path(sys.argv[2]).write_text(str(os.getpid())); time.sleep(60)
atexit.register(lambda: print("atexit ran"))
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text("import signal\n" + SCRIPT)
    return path


def test_a_run_gets_its_argv_cwd_threads_tmpdir_and_exit_handlers(script, tmp_path):
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    result = run_script(script, ["ok", "a=b c"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"argv ['ok', 'a=b c'] cwd {tmp_path} threads 1 tmp {tmp_path / 'tmp'}", "atexit ran"]
    assert "preloaded True on stderr" in result.stderr  # it ran warm: Lightning was already imported


def test_a_refusal_a_signal_and_a_timeout_end_as_they_would_in_a_fresh_process(script, tmp_path):
    refused = run_script(script, ["refuse"], cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.endswith("script.py: a one-line refusal\n")
    assert "Traceback" not in refused.stderr
    assert run_script(script, ["kill"], cwd=tmp_path).returncode == -signal.SIGKILL
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(script, ["sleep"], cwd=tmp_path, timeout=3)


def test_an_environment_libraries_read_at_import_starts_a_fresh_interpreter(script, tmp_path):
    result = run_script(script, ["ok"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert result.returncode == 0 and "preloaded False" in result.stderr


def test_a_run_ends_when_the_process_that_started_it_is_killed(script, tmp_path):
    # The run is the forkserver's child: killing its caller (a grid's reproduce.py) must not
    # leave it training unseen.
    pidfile = tmp_path / "pid"
    caller = subprocess.Popen([sys.executable, "-c", "import sys; from orthodiff.warm import run_script; "
                               f"run_script({str(script)!r}, ['pidfile', {str(pidfile)!r}], cwd={str(tmp_path)!r})"])
    deadline = time.time() + 60
    while not (pidfile.is_file() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    run = int(pidfile.read_text())
    os.kill(run, 0)  # running
    caller.kill()
    caller.wait()
    while time.time() < deadline:
        try:
            os.kill(run, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the run (pid {run}) outlived its caller by a minute")
