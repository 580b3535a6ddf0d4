"""The dumped task writes its own pages into the page file (lazarus/dump/selfwrite.py), and where it may not or
cannot, the old copy does it; the original is left exactly as it was either way, and killed at any moment too.

What proves the task wrote: its /proc/PID/io wchar grows by the page data (a dump's writes are the task's own
only this way). What proves nothing of ours is left in it: its fd table (numbers and what they point at) is the
same after the dump as before it, and no SIGXFSZ is pending.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
from pathlib import Path

import pytest

from lazarus.dump import memory as memory_mod
from lazarus.dump import selfwrite

try:
    import harness as H
    from test_dump_killed import tmp_dirs, wait_running
except ImportError:  # pragma: no cover
    from tests import harness as H
    from tests.test_dump_killed import tmp_dirs, wait_running

pytestmark = pytest.mark.root

CASE = H.CASES_BY_ID["memory-keep"]  # ~9 MiB in 9000 one-page runs (IOV_MAX splits), PROT_NONE and objects too
_SIGXFSZ = 1 << (signal.SIGXFSZ - 1)


def wchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar for pid {pid}")


def fd_table(pid: int) -> dict[str, str]:
    d = f"/proc/{pid}/fd"
    return {name: os.readlink(f"{d}/{name}") for name in os.listdir(d)}


def pending(pid: int) -> int:
    bits = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            bits |= int(line.split()[1], 16)
    return bits


def page_bytes(image: Path, pid: int) -> int:
    return (image / f"pages-{pid}.img").stat().st_size


def dump_restore(harness: H.Harness, target: H.Target, mode: str) -> int:
    """dump --leave-running; checks the original is as it was; kills it, restores the image (eager or lazy) and
    requires PASS. Returns how many bytes the original wrote during the dump (wchar)."""
    fds = fd_table(target.pid)
    before = wchar(target.pid)
    image = harness.image_dir()
    res = harness.dump(target, image, "--leave-running")
    assert res.returncode == 0, f"dump failed: {res.stderr}\n{target.describe()}"
    wrote = wchar(target.pid) - before
    assert fd_table(target.pid) == fds, "the dump left a descriptor in the original"
    assert not pending(target.pid) & _SIGXFSZ, "the dump left a SIGXFSZ pending in the original"
    target.signal(signal.SIGKILL)
    assert target.wait_exit(10) is not None
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0 and r.target is not None, f"restore failed: {r.stderr}"
    H.expect_pass(harness.run_case(CASE, r.target), r.target, r)
    return wrote if page_bytes(image, target.pid) else -1


@pytest.mark.parametrize("mode", ("eager", "lazy"))
def test_the_task_writes_its_own_pages(harness: H.Harness, mode: str) -> None:
    target = harness.start_case(CASE)
    wrote = dump_restore(harness, target, mode)
    assert wrote >= selfwrite.MIN, f"the original wrote {wrote} bytes: the dump did not let it write its pages"


@pytest.mark.parametrize("mode", ("eager", "lazy"))
def test_low_file_size_limit_dumps_the_old_way(harness: H.Harness, mode: str) -> None:
    """A soft RLIMIT_FSIZE below the page file's size: a pwritev past it would fail with EFBIG and queue SIGXFSZ
    to the task, so the old copy writes everything."""
    target = harness.start_case(CASE)
    hard = resource.prlimit(target.pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(target.pid, resource.RLIMIT_FSIZE, (1 << 20, hard))
    assert selfwrite.refusal(target.pid, 2 << 20) is not None
    wrote = dump_restore(harness, target, mode)
    assert wrote < 1 << 20, f"the original wrote {wrote} bytes with RLIMIT_FSIZE 1 MiB"


def test_a_failing_pwritev_leaves_the_rest_to_the_old_copy(harness: H.Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task is handed a read-only descriptor of the page file: its first pwritev fails (EBADF), and the
    dump copies everything the old way; the image restores."""
    from lazarus import dump as api_dump
    from lazarus.images.writer import PagesWriter

    target = harness.start_case(CASE)
    fds = fd_table(target.pid)
    opened: list[int] = []

    def read_only(self: PagesWriter) -> int:
        fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY)
        opened.append(fd)
        return fd

    seen: list[str] = []
    real = memory_mod.MemoryDumper._copy_small

    def spy(self: memory_mod.MemoryDumper, ext: object, total: int, split: int) -> None:
        real(self, ext, total, split)
        seen.append(self.selfwrite)

    monkeypatch.setattr(PagesWriter, "fileno", read_only)
    monkeypatch.setattr(memory_mod.MemoryDumper, "_copy_small", spy)
    image = harness.image_dir()
    api_dump(target.pid, image, leave_running=True)
    for fd in opened:
        os.close(fd)
    assert seen and seen[0].startswith("0 bytes by the task itself, the rest copied: pwritev in the task failed"), seen
    assert fd_table(target.pid) == fds
    target.signal(signal.SIGKILL)
    assert target.wait_exit(10) is not None
    r = harness.restore(image, like=target)
    assert r.returncode == 0 and r.target is not None, f"restore failed: {r.stderr}"
    H.expect_pass(harness.run_case(CASE, r.target), r.target, r)


@pytest.mark.parametrize("mode", ("eager", "lazy"))
def test_a_split_page_file_the_task_writes_half_of(harness: H.Harness, mode: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A large dump's split page file, scaled down (1 MiB pieces): the task writes the first part while our
    thread copies the second (the rseq area's piece included, wherever it falls), and the image restores."""
    from lazarus import dump as api_dump

    monkeypatch.setattr(memory_mod, "_SPLIT_MIN", 1 << 20)
    monkeypatch.setattr(memory_mod, "_SPLIT_SHARE", 0.3)
    monkeypatch.setattr(selfwrite, "PIECE", 1 << 20)
    seen: list[str] = []
    real = memory_mod.MemoryDumper._copy_small

    def spy(self: memory_mod.MemoryDumper, ext: object, total: int, split: int) -> None:
        real(self, ext, total, split)
        seen.append(f"{split} {self.selfwrite}")

    monkeypatch.setattr(memory_mod.MemoryDumper, "_copy_small", spy)
    target = harness.start_case(CASE)
    fds = fd_table(target.pid)
    before = wchar(target.pid)
    image = harness.image_dir()
    api_dump(target.pid, image, leave_running=True)
    wrote = wchar(target.pid) - before
    split, words = int(seen[0].split()[0]), seen[0].split()[1:]
    assert split and words[1:5] == ["bytes", "by", "the", "task"], seen
    assert selfwrite.MIN <= int(words[0]) <= split and wrote >= int(words[0]), (seen, wrote)
    assert (image / f"pages-{target.pid}.1.img").stat().st_size > 0
    assert fd_table(target.pid) == fds
    assert not pending(target.pid) & _SIGXFSZ
    target.signal(signal.SIGKILL)
    assert target.wait_exit(10) is not None
    r = harness.restore(image, lazy=mode == "lazy", like=target)
    assert r.returncode == 0 and r.target is not None, f"restore failed: {r.stderr}"
    H.expect_pass(harness.run_case(CASE, r.target), r.target, r)


def _dump_killed_while_writing(pid: int, image: Path, moment: str) -> tuple[int, int | None]:
    """Fork a dump (leave_running) that SIGKILLs itself at `moment`: "given" once the task holds the page file,
    "writing" once its first piece is written, "closing" when the task's descriptor is about to be closed.
    Returns the child's wait status and its watchdog's pid."""
    def body(w: int) -> int:  # pragma: no cover - runs in the child
        def die() -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        real_open, real_write, real_close = (selfwrite.SelfWriter.open, selfwrite.SelfWriter.write,
                                             selfwrite.SelfWriter.close)

        def opened(self: selfwrite.SelfWriter) -> bool:
            ok = real_open(self)
            if moment == "given" and ok:
                die()
            return ok

        def write(self: selfwrite.SelfWriter, calls, done, stop):  # type: ignore[no-untyped-def]
            def done_then_die(piece: int) -> None:
                done(piece)
                die()
            return real_write(self, calls, done_then_die if moment == "writing" else done, stop)

        def close(self: selfwrite.SelfWriter) -> None:
            if moment == "closing":
                die()
            real_close(self)

        # 1 MiB pieces, two per stop: the task still holds the page file after its first piece.
        selfwrite.PIECE = 1 << 20
        selfwrite.SelfWriter.open = opened  # type: ignore[method-assign]
        selfwrite.SelfWriter.write = write  # type: ignore[method-assign]
        selfwrite.SelfWriter.close = close  # type: ignore[method-assign]
        from lazarus.dump import dump
        dump(pid, image, leave_running=True)
        return 1  # got past the moment without being killed: the parent fails the test

    status, got = H.fork_dump(body)
    return status, got[0] if got else None


@pytest.mark.parametrize("moment", ["given", "writing", "closing"])
def test_dump_killed_while_the_task_writes(harness: H.Harness, moment: str) -> None:
    """The dump killed while the task holds the page file (given, writing, about to close it): the watchdog
    closes that descriptor in the task, puts the rest back, and the original runs on unchanged (same fd table,
    no signal left pending) and passes its own checks."""
    target = harness.start_case(CASE)
    fds = fd_table(target.pid)
    sig_before = pending(target.pid)
    image = harness.image_dir()
    for i in range(1, 4):
        status, watchdog = _dump_killed_while_writing(target.pid, image, moment)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"{moment} {i}: the dump was not killed there (status {status:#x})"
        what = f"dump killed {moment} ({i})"
        wait_running(target, what, watchdog)
        assert fd_table(target.pid) == fds, f"{what}: the task's fds {fd_table(target.pid)}, before {fds}"
        assert pending(target.pid) == sig_before, f"{what}: signals pending {pending(target.pid):#x}"
        assert not image.exists()
        for leftover in tmp_dirs(image):
            shutil.rmtree(image.parent / leftover)
    target.mark()
    target.signal(signal.SIGUSR2)
    H.expect_pass(target.wait_result(), target)


def test_calls_cut_at_call_size_and_iov_max() -> None:
    """calls_for(): consecutive file offsets, at most CALL bytes and IOV_MAX iovecs a call; _skip() drops a
    short write's part."""
    page = 4096
    runs = [(0x10000000 + 2 * i * page, page) for i in range(3000)] + [(0x20000000, 3 * selfwrite.CALL)]
    calls = selfwrite.calls_for(7, 1 << 20, runs)
    pos = 1 << 20
    flat = []
    for piece, at, iovs in calls:
        assert piece == 7 and at == pos
        assert len(iovs) <= 1024 and sum(n for _, n in iovs) <= selfwrite.CALL
        pos += sum(n for _, n in iovs)
        flat += iovs
    assert pos == (1 << 20) + sum(n for _, n in runs)
    merged: list[tuple[int, int]] = []
    for a, n in flat:
        if merged and merged[-1][0] + merged[-1][1] == a and a >= 0x20000000:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((a, n))
    assert merged == runs
    assert selfwrite._skip([(0x1000, 8192), (0x9000, 4096)], 8192 + 100) == [(0x9000 + 100, 4096 - 100)]


def test_memory_limit_read_from_cgroup_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """memory_limit() finds a limit on the task's cgroup or any ancestor, v2 (memory.max, memory.high) or v1."""
    text = {"v": ""}
    monkeypatch.setattr(selfwrite.procfs, "read_text", lambda path, pid=None: text["v"])
    v2 = tmp_path / "v2"
    (v2 / "a" / "b").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory\n")
    for d in (v2 / "a", v2 / "a" / "b"):
        (d / "memory.max").write_text("max\n")
        (d / "memory.high").write_text("max\n")
    text["v"] = "0::/a/b\n"
    assert selfwrite.memory_limit(1, str(v2)) is None
    (v2 / "a" / "memory.high").write_text("1048576\n")
    assert selfwrite.memory_limit(1, str(v2)) == f"memory cgroup limit {v2}/a/memory.high 1048576"
    v1 = tmp_path / "v1"
    (v1 / "memory" / "x").mkdir(parents=True)
    (v1 / "memory" / "x" / "memory.limit_in_bytes").write_text(str((1 << 63) - 4096) + "\n")
    text["v"] = "5:memory:/x\n0::/\n"
    assert selfwrite.memory_limit(1, str(v1)) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("268435456\n")
    assert selfwrite.memory_limit(1, str(v1)) == f"memory cgroup limit {v1}/memory/memory.limit_in_bytes 268435456"
