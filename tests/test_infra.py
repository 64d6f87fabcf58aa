"""infra: no side effect at import, the output permission rule, the lock's message as logging, the one
"auto" device rule, the CLI's log handler.

Run: ``pytest tests/test_infra.py -q`` (a few seconds; CPU).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import torch

from criticality.infra import distributed, files, lock, log


def test_importing_files_leaves_the_umask_alone_and_output_mode_reads_it():
    code = ("import os, unittest.mock as m\n"
            "with m.patch('os.umask', side_effect=AssertionError('umask at import')):\n"
            "    import criticality.infra.files as f\n"
            "os.umask(0o027)\n"
            "print(oct(f.output_mode()), oct(os.umask(0o022)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.split()
    assert out == ["0o640", "0o27"]  # read lazily, and the process umask is what it was
    mask = os.umask(0o022)
    os.umask(mask)
    assert files.output_mode() == 0o666 & ~mask


def test_waiting_for_the_lock_is_an_info_message(tmp_path, capsys):
    fd = lock.acquire(tmp_path, "holder")
    try:
        logging.getLogger("criticality.infra.lock").setLevel(logging.INFO)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("criticality.infra.lock").addHandler(handler)
        lock.POLL_S, poll = 0.01, lock.POLL_S
        threading.Timer(0.2, lock.release, [fd]).start()
        second = lock.acquire(tmp_path, "waiter", wait=True)
        lock.release(second)
    finally:
        lock.POLL_S = poll
        logging.getLogger("criticality.infra.lock").removeHandler(handler)
        logging.getLogger("criticality.infra.lock").setLevel(logging.NOTSET)
    (record,) = records
    assert record.levelno == logging.INFO and record.getMessage().startswith("waiting for PID")
    assert capsys.readouterr().err == ""  # the library itself prints nothing


def test_the_cli_handler_shows_info_bare_and_warnings_prefixed(capsys):
    logger = logging.getLogger("criticality.core.something")
    with log.to_stderr():
        logger.info("waiting for a lock")
        logger.warning("a NaN cell")
        logger.debug("not shown")
    logger.warning("after the block: not through our handler")
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["waiting for a lock", "criticality: warning: a NaN cell"]
    assert not logging.getLogger("criticality").handlers


def test_auto_device_is_the_one_rule():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.auto_device() == distributed.auto_device("auto") == want
    assert distributed.auto_device("cpu") == "cpu" and distributed.auto_device("cuda:1") == "cuda:1"
    if want == "cpu":
        assert distributed.resolve_device("auto") == torch.device("cpu")
