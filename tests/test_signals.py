"""Ctrl-C and SIGTERM outside the training loop (which saves a checkpoint itself; see
tests/test_faults.py and tests/test_reliability.py): while torch and Pyro import, while the data
load, while the result prints, and three ways a signal inside *library* code escaped our one line.
A ``KeyboardInterrupt`` raised in code compiled from a string (``dataclasses``' methods) made
``python -m`` kill itself with SIGINT (exit -2); one that Python 3.11 wraps in a ``RuntimeError``
(a class's ``__set_name__``) gave a traceback and exit 1; one that a native import turned into an
``ImportError``, caught by an optional import, was lost, and every later signal ignored. All
three struck when a signal landed in torch's lazy imports (``torch._dynamo``, on the first
optimizer). Each test asserts the exit code (128 + signal), exactly one stderr line and no
traceback.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import (
    FIT,
    REPO,
    TINY,
    assert_one_line,
    bits,  # noqa: F401  (a fixture)
    copy_run,
    finish,
    run2,  # noqa: F401  (a fixture)
    snapshot,
    spawn,
    wait_for,
)

from ppl_vae.core.cli import Terminated, user_errors
from ppl_vae.core.errors import UserError, WriteError

# --------------------------------------------------------------------------- start-up


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (Linux: SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads SigCgt from /proc (Linux)")
@pytest.mark.parametrize("module", ["fit", "evaluate", "sample"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_imports_is_one_line(bits, tmp_path, sig, module):
    """Ctrl-C or SIGTERM while ``python -m ppl_vae.MODULE`` imports torch and Pyro: exit
    128 + signal, one line, no traceback, no run directory. The signal is sent once the module's
    start-up guard is in place (it catches SIGTERM; seen in /proc, not guessed from a sleep: sent
    0.5 s after the spawn, under load, a SIGTERM could arrive before the guard, and that kills
    Python as any program, exit -15), then 0.2 s into the imports (about 1.5 s)."""
    out = tmp_path / "run"
    p = spawn(*(["--dataset", bits, *TINY, "--out", out] if module == "fit" else [out]), module=module)
    deadline = time.monotonic() + 60
    while p.poll() is None and not catches(p.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(0.2)
    assert p.poll() is None, "start-up took under 0.2 s: the signal would not land in it"
    p.send_signal(sig)
    assert_one_line(finish(p), 128 + sig, f"python -m ppl_vae.{module}: interrupted by {sig.name}")
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_loading_the_data_leaves_no_half_made_run(bits, run2, tmp_path, sig):
    """The signal arrives after the run directory was made and locked, while the data load: exit
    128 + signal, one line; a new --out is removed, an existing run (``--overwrite``) is left
    byte-identical (but for ``.lock``, which names the last holder)."""
    existing = sig == signal.SIGTERM
    out, marker = tmp_path / "run", tmp_path / "loading"
    if existing:
        copy_run(run2, out)
    before = snapshot(out) if existing else None
    extra = ["--overwrite"] if existing else []
    p = spawn("--dataset", bits, *TINY, "--out", out, *extra, fault={"pause_data": str(marker)})
    wait_for(marker, p)
    p.send_signal(sig)
    assert_one_line(finish(p), 128 + sig, f"{FIT}: interrupted by {sig.name}")
    if existing:
        assert snapshot(out) == before
    else:
        assert not out.exists()


# --------------------------------------------------------------------------- run_command, deterministic

PROGRAM = """
import atexit, os, signal, sys
from ppl_vae.core.cli import run_command, startup

def kill():
    os.kill(os.getpid(), signal.{sig})
    for _ in range(10**6):  # the handler runs at the next check, here
        pass

class SetName:
    def __set_name__(self, owner, name):
        kill()

def where():
    if "{where}" == "printing":
        print("result", flush=True)
        for _ in range({times}):
            kill()  # lands between two prints, as a Ctrl-C may
        print("more", flush=True)
    elif "{where}" == "exiting":
        atexit.register(lambda: os.kill(os.getpid(), signal.{sig}))  # while the interpreter tears down
    elif "{where}" == "exec":
        exec("kill()")  # as dataclasses build __init__: CPython marks the interrupt unhandled
    elif "{where}" == "set_name":
        type("C", (), {{"field": SetName()}})  # Python 3.11: RuntimeError from the interrupt
    elif "{where}" == "swallowed":
        try:  # as torch's check for triton: the native import's ImportError, caught
            try:
                kill()
            except KeyboardInterrupt as e:
                raise ImportError("initialization failed") from e
        except ImportError:
            pass
        print("still working", flush=True)
        kill()  # the user's second Ctrl-C
        print("not reached", flush=True)
    elif "{where}" == "unwinding":
        try:
            kill()
        finally:  # clean-up, hit by repeats: they are ignored and it runs whole
            for _ in range({times}):
                kill()
            print("cleaned up", flush=True)

if "{phase}" == "startup":
    with startup("prog"):
        where()

def main():
    where()
    return 0

run_command("prog", main)
"""


@pytest.mark.parametrize(
    "phase,where,sig,times,code",
    [
        ("main", "printing", "SIGINT", 1, 130),
        ("main", "printing", "SIGTERM", 1, 143),
        ("main", "printing", "SIGINT", 3, 130),
        ("main", "exiting", "SIGINT", 1, 0),
        ("main", "exiting", "SIGTERM", 1, 0),
        ("main", "exec", "SIGINT", 1, 130),
        ("main", "exec", "SIGTERM", 1, 143),
        ("main", "set_name", "SIGINT", 1, 130),
        ("startup", "exec", "SIGINT", 1, 130),
        ("startup", "set_name", "SIGINT", 1, 130),
        ("startup", "set_name", "SIGTERM", 1, 143),
        ("main", "swallowed", "SIGINT", 1, 130),
        ("main", "swallowed", "SIGTERM", 1, 143),
        ("main", "unwinding", "SIGINT", 3, 130),
        ("main", "unwinding", "SIGTERM", 1, 143),
    ],
)
def test_run_command_turns_any_signal_into_one_line_or_ignores_it_after_the_work(
    tmp_path, phase, where, sig, times, code
):
    """Deterministic forms of the Ctrl-C races, run as ``python -m`` (the way the CLI runs, and
    the only way CPython's unhandled-interrupt mark turns the exit into -2): a signal (or three)
    while the command prints its result, inside code compiled from a string, or inside a class's
    ``__set_name__``, while starting or in ``main``, gives exit 128 + n and exactly one line; so
    does a second one after library code swallowed the first; repeats while the first unwinds
    leave its clean-up whole; one while the interpreter exits is ignored."""
    (tmp_path / "prog.py").write_text(PROGRAM.format(phase=phase, where=where, sig=sig, times=times))
    r = subprocess.run(
        [sys.executable, "-m", "prog"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert ("cleaned up" in r.stdout) == (where == "unwinding") and "not reached" not in r.stdout, r.stdout
    when = " while starting" if phase == "startup" else ""
    assert r.stderr.splitlines() == ([f"prog: interrupted by {sig}{when}"] if code else []), r.stderr


@pytest.mark.parametrize(
    "error,code,line",
    [
        (UserError("bad --lr"), 2, "prog: error: bad --lr"),
        (OSError(28, "No space left on device"), 1, "prog: error: [Errno 28] No space left on device"),
        (UserError("download failed"), 130, "prog: interrupted by SIGINT"),
        (WriteError("could not write summary.json"), 143, "prog: interrupted by SIGTERM"),
    ],
)
def test_an_error_with_an_interrupt_behind_it_is_the_interrupt(capsys, error, code, line):
    """``user_errors``: bad input exits 2 and a failed write 1, each on one line; the same errors
    raised while handling a Ctrl-C or SIGTERM (``raise ... from``, as a download or an atomic
    write rewords what stopped it) are the interrupt: exit 130 / 143 and its line."""
    if code > 128:
        behind = Terminated() if code == 143 else KeyboardInterrupt()
        error.__cause__ = RuntimeError("wrapped")
        error.__cause__.__cause__ = behind
    with pytest.raises(SystemExit) as stop, user_errors("prog"):
        raise error
    assert stop.value.code == code
    assert capsys.readouterr().err.splitlines() == [line]
