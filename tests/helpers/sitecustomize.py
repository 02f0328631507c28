"""Loaded by every Python process started with this folder on PYTHONPATH (tests/trainer/test_distributed.py).

In a pact-train rank (RANK set) with PACT_TEST_KILL_AT=N: right after the checkpoint of step N is
written, every rank of the job and the launcher are killed with SIGKILL, as a preempted machine
would be. Each rank records its pid in PACT_TEST_PIDS so that rank 0 can find the others.
"""

import os
import signal

if os.environ.get("RANK") is not None and os.environ.get("PACT_TEST_KILL_AT"):
    import pact_train.checkpoint as _ck

    _pids = os.environ["PACT_TEST_PIDS"]
    with open(os.path.join(_pids, os.environ["RANK"]), "w") as _f:
        _f.write(str(os.getpid()))
    _real = _ck.save_checkpoint

    def _save_then_kill(path, model, optimizer, state):
        _real(path, model, optimizer, state)
        if state["step"] == int(os.environ["PACT_TEST_KILL_AT"]):
            for name in os.listdir(_pids):
                pid = int(open(os.path.join(_pids, name)).read())
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
            os.kill(os.getppid(), signal.SIGKILL)  # the launcher
            os.kill(os.getpid(), signal.SIGKILL)

    _ck.save_checkpoint = _save_then_kill
