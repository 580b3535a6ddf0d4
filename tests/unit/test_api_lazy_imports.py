"""The command's start-up stays cheap: `import lazarus` and the CLI module load neither the library's heavy
layers (dump, restore, lazy, kernel) nor the service's HTTP stack; `lazarus.dump` and friends load on first use."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("lazarus.api", "lazarus.dump", "lazarus.restore", "lazarus.lazy.server", "lazarus.lazy.daemon",
         "lazarus.kernel.ptrace", "lazarus.service", "http.server", "socketserver", "rich")


def _loaded(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_cli_import_loads_nothing_heavy() -> None:
    loaded = _loaded("import lazarus, lazarus.cli; lazarus.cli._parser()")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_api_names_load_on_first_use() -> None:
    loaded = _loaded("import lazarus; f = lazarus.show; assert callable(f) and f.__module__ == 'lazarus.api'")
    assert "lazarus.api" in loaded
    assert not loaded & {"lazarus.restore", "lazarus.dump", "lazarus.service", "http.server"}, loaded


def test_unknown_attribute_is_an_attribute_error() -> None:
    import lazarus
    try:
        lazarus.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("lazarus.no_such_thing did not raise AttributeError")
