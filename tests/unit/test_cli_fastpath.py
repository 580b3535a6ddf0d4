"""cli._plain_line reads a well-formed `restore` or `dump` line without argparse (start-up time): it must give
exactly the namespace argparse gives, and leave everything else (errors, help, other commands) to argparse."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lazarus import cli

SAME = [
    ["restore", "-D", "img"],
    ["restore", "-D", "img", "-d"],
    ["restore", "--lazy", "-d", "-D", "/a b/img", "--pidfile", "p"],
    ["-v", "--debug", "restore", "--images-dir", "img", "--detach", "--pidns"],
    ["--verbose", "-v", "restore", "-D", "x", "--lazy", "--no-background", "--stats", "s.json", "--lazy-log", "l",
     "--lazy-pages-socket", "sock"],
    ["restore", "-D", "first", "-D", "second"],
    ["restore", "-d", "-d", "-D", "img"],
    ["dump", "-t", "1", "-D", "img"],
    ["-v", "dump", "--tree", "4242", "--images-dir", "/a b/img", "--no-sync", "--leave-running"],
    ["dump", "-D", "img", "--shell-job", "--direct", "-t", "007", "-t", "9"],
]

ARGPARSE = [
    [], ["restore"], ["restore", "-d"], ["restore", "-D"], ["restore", "-D", "-d"], ["restore", "-D", ""],
    ["restore", "-D=img"], ["restore", "--images-dir=img"], ["restore", "-D", "img", "--laz"],
    ["restore", "-D", "img", "extra"], ["restore", "-D", "img", "--"], ["restore", "-dD", "img"],
    ["-vv", "restore", "-D", "img"], ["--help"], ["restore", "--help"], ["restore", "-D", "img", "-h"],
    ["show", "img"], ["--version"], ["restor", "-D", "img"],
    ["restore", "-D", "img", "--pidfile"],
    ["dump", "-t", "1"], ["dump", "-D", "img"], ["dump", "-t", "x", "-D", "img"], ["dump", "-t", "-1", "-D", "img"],
    ["dump", "-t", "0x10", "-D", "img"], ["dump", "-t", "1", "-D", "img", "--no-syn"], ["dump", "-t1", "-D", "img"],
    ["dump", "-t", "1", "-D", "img", "--lazy"], ["dump", "-t", "1", "-D", "img", "-d"], ["dump", "--help"],
]


@pytest.mark.parametrize("argv", SAME, ids=" ".join)
def test_same_namespace_as_argparse(argv: list[str]) -> None:
    fast = cli._plain_line(argv)
    assert fast is not None
    assert vars(fast) == vars(cli._parser(argv).parse_args(argv))


@pytest.mark.parametrize("argv", ARGPARSE, ids=lambda a: " ".join(a) or "(none)")
def test_everything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert cli._plain_line(argv) is None


def test_restore_line_loads_no_argparse() -> None:
    """A plain restore line (of a missing image: the error is ours, one line) never imports argparse."""
    code = ("import sys; from lazarus import cli; rc = cli.main(['restore', '-D', '/nonexistent/lazarus-img', '-d']);"
            "print(rc, 'argparse' in sys.modules, 'gettext' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "False", "False"], (out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and "lazarus: error:" in out.stderr, out.stderr


def test_dump_line_loads_no_argparse(tmp_path) -> None:
    """A plain dump line (of a pid that does not exist: the error is ours, one line) never imports argparse."""
    code = ("import sys; from lazarus import cli; rc = cli.main(['dump', '-t', '999999999', '-D', sys.argv[1]]);"
            "print(rc, 'argparse' in sys.modules, 'gettext' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "img")], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["1", "False", "False"], (out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and "lazarus: error:" in out.stderr and "999999999" in out.stderr, out.stderr
