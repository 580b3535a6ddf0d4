"""lazarus/launcher.py: the `lazarus` command `make install` writes starts the interpreter without site, with
the paths site would have added, and behaves as the console script did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lazarus import launcher


def test_site_paths_are_what_site_adds() -> None:
    paths = launcher.site_paths()
    assert paths, "site adds no path here"
    without_site = subprocess.run([sys.executable, "-S", "-c", "import sys; print('\\n'.join(sys.path))"],
                                  capture_output=True, text=True, check=True).stdout.splitlines()
    assert not set(paths) & set(without_site)
    assert all(p in sys.path for p in paths)
    # the directory rich is installed in (the command's tables) is among them
    import rich
    assert any(Path(rich.__file__).is_relative_to(p) for p in paths)


def test_written_launcher_runs_the_command_without_site(tmp_path: Path) -> None:
    script = tmp_path / "lazarus"
    assert launcher.write(str(script))
    text = script.read_text()
    assert text.startswith(f"#!{sys.executable} -S\n")
    assert os.stat(script).st_mode & 0o777 == 0o755
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert (res.returncode, res.stdout.strip()) == (0, "lazarus 0.1.0"), res.stderr
    missing = tmp_path / "no-image"
    bad = subprocess.run([str(script), "restore", "-D", str(missing)], capture_output=True, text=True, timeout=60,
                         env=env, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("lazarus: error: ") and str(missing) in bad.stderr
    assert len(bad.stderr.splitlines()) == 1, bad.stderr
    # the interpreter of the script has no site, yet finds lazarus and rich
    probe = tmp_path / "probe"
    probe.write_text(text.replace("from lazarus.cli import entry\nentry()\n",
                                  "import lazarus, rich\nprint('site' in sys.modules, sys.flags.no_site)\n"))
    probe.chmod(0o755)
    out = subprocess.run([str(probe)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.stdout.split() == ["False", "1"], out.stderr
