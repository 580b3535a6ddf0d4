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


def test_written_launcher_imports_from_its_code_cache(tmp_path: Path) -> None:
    """The launcher maps the code of every command's modules (restore, dump) from one file (lazarus/codecache.py):
    the modules come from there, with the __file__ of their source, and the command works."""
    script = tmp_path / "bin" / "lazarus"
    script.parent.mkdir()
    assert launcher.write(str(script))
    cache = Path(launcher.cache_path(str(script)))
    assert cache.is_file() and f"install({str(cache)!r})" in script.read_text()
    probe = tmp_path / "bin" / "probe"
    probe.write_text(script.read_text().replace(
        f"install({str(cache)!r})", f"cache = install({str(cache)!r})").replace(
        "from lazarus.cli import entry\nentry()\n",
        "import lazarus.cli, lazarus.restore, lazarus.lazy.daemon, json, lazarus.dump.memory\n"
        "r = sys.modules['lazarus.restore']\n"
        "print(len(cache.served), 'lazarus.restore' in cache.served, 'json' in cache.served,\n"
        "      'lazarus.dump.memory' in cache.served, r.__file__ == r.__spec__.origin, r.__file__)\n"))
    probe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(probe)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    served, restore, json_, dump, same, where = out.stdout.split()
    assert int(served) > 50 and restore == json_ == dump == same == "True", out.stderr
    import lazarus.restore  # noqa: F401 - the package (lazarus.restore names the API's function)
    assert where == sys.modules["lazarus.restore"].__file__
    # PYTHONPATH may put other modules first: the cache then stays out of the way
    out = subprocess.run([str(probe)], capture_output=True, text=True, timeout=60, env={**env, "PYTHONPATH": "/"},
                         cwd=tmp_path)
    assert "AttributeError" in out.stderr  # install() returned None: nothing served


def test_code_cache_leaves_a_changed_module_to_the_import_system(tmp_path: Path) -> None:
    """A module whose source is not the one recorded (size, mtime) is compiled from its source as usual."""
    import importlib
    import marshal

    from lazarus.codecache import CodeCache
    (tmp_path / "cc_pkg").mkdir()
    (tmp_path / "cc_pkg" / "__init__.py").write_text("")
    mod = tmp_path / "cc_pkg" / "mod.py"
    mod.write_text("VALUE = 1\n")
    entries, blobs = {}, b""
    for name, path in (("cc_pkg", tmp_path / "cc_pkg" / "__init__.py"), ("cc_pkg.mod", mod)):
        code = marshal.dumps(compile(path.read_text(), str(path), "exec"))
        st = path.stat()
        entries[name] = (str(path), name == "cc_pkg", st.st_size, st.st_mtime_ns, len(blobs), len(code))
        blobs += code
    cache = CodeCache(dict(entries), memoryview(blobs))
    sys.path.insert(0, str(tmp_path))
    sys.meta_path.insert(0, cache)
    try:
        m = importlib.import_module("cc_pkg.mod")
        assert (m.VALUE, cache.served, m.__file__) == (1, ["cc_pkg", "cc_pkg.mod"], str(mod))
        del sys.modules["cc_pkg.mod"]
        mod.write_text("VALUE = 22\n")  # another size: not the recorded source
        cache.entries["cc_pkg.mod"] = entries["cc_pkg.mod"]
        assert cache.find_spec("cc_pkg.mod") is None and "cc_pkg.mod" not in cache.entries
        assert importlib.import_module("cc_pkg.mod").VALUE == 22
    finally:
        sys.meta_path.remove(cache)
        sys.path.remove(str(tmp_path))
        for name in ("cc_pkg.mod", "cc_pkg"):
            sys.modules.pop(name, None)
