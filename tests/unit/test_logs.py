"""lazarus/logs.py: loggers that leave `logging` unimported until a message could be shown, and forward
everything to logging once it is imported (so whoever configures logging sees every message)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from lazarus import logs


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.splitlines()[-1]) | {"stderr": out.stderr}


def test_debug_and_info_do_not_import_logging() -> None:
    res = _run("import sys, json\nfrom lazarus.logs import getLogger\nlog = getLogger('lazarus.x')\n"
               "log.debug('d %s', 1)\nlog.info('i')\nprint(json.dumps({'loaded': 'logging' in sys.modules}))")
    assert res == {"loaded": False, "stderr": ""}


def test_a_warning_imports_logging_runs_the_hook_once_and_is_shown() -> None:
    res = _run("import sys, json\nfrom lazarus import logs\ncalls = []\n"
               "logs.on_first_use = lambda: calls.append(1)\nlog = logs.getLogger('lazarus.x')\n"
               "log.warning('careful: %s', 'pid 7')\nlog.error('again')\n"
               "print(json.dumps({'loaded': 'logging' in sys.modules, 'calls': len(calls)}))")
    assert res["loaded"] is True and res["calls"] == 1
    assert "careful: pid 7" in res["stderr"] and "again" in res["stderr"]  # logging's last-resort handler


def test_the_command_logs_warnings_in_its_format_without_verbose() -> None:
    res = _run("import sys, json\nfrom lazarus import cli\ncli._setup_logging(0)\n"
               "assert 'logging' not in sys.modules\n"
               "from lazarus.logs import getLogger\ngetLogger('lazarus.restore').warning('pid %d odd', 42)\n"
               "getLogger('lazarus.restore').info('not shown')\nprint(json.dumps({}))")
    (line,) = res["stderr"].splitlines()
    assert line.endswith("lazarus.restore: pid 42 odd") and "[" in line, line


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR])
def test_forwards_every_level_once_logging_is_imported(caplog: pytest.LogCaptureFixture, level: int) -> None:
    log = logs.getLogger("lazarus.test_logs")
    with caplog.at_level(logging.DEBUG, logger="lazarus.test_logs"):
        getattr(log, logging.getLevelName(level).lower())("message %d", level)
    (rec,) = caplog.records
    assert (rec.levelno, rec.getMessage(), rec.name) == (level, f"message {level}", "lazarus.test_logs")
    assert rec.filename == "test_logs.py", "the record names the caller, not lazarus/logs.py"


def test_exception_carries_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log = logs.getLogger("lazarus.test_logs")
    with caplog.at_level(logging.DEBUG, logger="lazarus.test_logs"):
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    (rec,) = caplog.records
    assert rec.exc_info is not None and rec.exc_info[0] is ValueError
