"""A dump killed at any moment leaves the original running exactly as it was (issue 8, item 1).

The dump is killed (SIGKILL, as an OOM kill would) just before each of its ptrace calls in turn, K = 1, 2, ...
until a dump runs to the end, and at random moments after it attached. Each time the original (the survivor
target: known mask, handlers, pending signal, memory map and registers) must be running again untraced within a
few seconds, with nobody's help but the dump's own watchdog, and pass its self-check. Killed dumps leave their
DIR.tmp-* directories behind; the next dump to the same place removes them.

The per-K sweep forks the dump from pytest (lazarus.dump.dump with ptrace.set_test_kill(K)) rather than running
the CLI each time, to keep ~300 kills within seconds; a few K go through the real CLI with
LAZARUS_TEST_KILL_AT_PTRACE, and the random-moment kills too.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazarus.dump import dump  # imported here once, not in every forked dump
from lazarus.kernel import ptrace

try:
    import harness as H
except ImportError:  # pragma: no cover
    from tests import harness as H

pytestmark = pytest.mark.root

RECOVER_TIMEOUT = 10.0  # the issue asks for "within a few seconds"; this bounds the wait, timing is asserted apart
RECOVER_BUDGET = 3.0


def tmp_dirs(image: Path) -> list[str]:
    return sorted(p for p in os.listdir(image.parent) if p.startswith(f"{image.name}.tmp-"))


def traced_by(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid for pid {pid}")


def wait_running(target: H.Target, what: str, watchdog: int | None = None) -> float:
    """Wait until the watchdog (if given: our adopted child) has exited and the original runs untraced; returns
    the seconds that took."""
    t0 = time.monotonic()
    deadline = t0 + RECOVER_TIMEOUT
    if watchdog is not None:
        assert H.reap(watchdog, RECOVER_TIMEOUT) is not None, f"{what}: watchdog {watchdog} still runs"
    while True:
        state = H.proc_state(target.pid)
        assert state not in (None, "Z", "X"), f"{what}: the original died: {target.describe()}"
        if state in ("S", "R") and traced_by(target.pid) == 0:
            return time.monotonic() - t0
        assert time.monotonic() < deadline, (
            f"{what}: the original is {state}, traced by {traced_by(target.pid)} after {RECOVER_TIMEOUT} s: "
            f"{target.describe()}")
        time.sleep(0.002)


def check_ok(target: H.Target, n: int, what: str) -> int:
    """Ask the survivor for its n-th check (SIGUSR1) and require '# check n ok'. Returns how many times its SIGCONT
    handler has run."""
    target.signal(signal.SIGUSR1)
    want = f"# check {n} ok (SIGCONT handled "
    deadline = time.monotonic() + 10.0
    while True:
        lines = target.log_text().splitlines()
        for line in lines:
            if line.startswith(want):
                return int(line[len(want):].split()[0])
        bad = [ln for ln in lines if ln.startswith(f"# check {n} FAIL")]
        assert not bad, f"{what}: {bad[0]}"
        assert target.alive(), f"{what}: the original died: {target.describe()}"
        assert time.monotonic() < deadline, f"{what}: no '{want}': {target.describe()}"
        time.sleep(0.002)


def forked_dump(pid: int, image: Path, kill_at: int, fail: bool = False,
                batch: bool = True, prepared: bool = False) -> tuple[int, int | None, int | None]:
    """Run lazarus.dump.dump(leave_running) in a forked child that SIGKILLs itself before its kill_at-th ptrace
    call (fail: whose kill_at-th call fails instead). Returns the child's wait status, the pid of its watchdog
    (adopted by pytest, the subreaper) and, if the dump returned, how many ptrace calls it made.
    batch=False: the injected calls are made one by one, as in a task whose SIGTRAP is ignored or pending.
    prepared: the watchdog is forked ahead, with no target yet (as in a service worker: Watchdog.prepare)."""
    def body(w: int) -> int:  # pragma: no cover - runs in the child
        from lazarus.dump.watchdog import Watchdog
        wd = Watchdog.prepare() if prepared else None
        if not batch:
            # the package (`lazarus.dump` as an attribute is the api's function)
            sys.modules["lazarus.dump"]._may_batch = lambda _pid: False  # type: ignore[attr-defined]
        if fail:
            ptrace.set_test_fail(kill_at)
        else:
            ptrace.set_test_kill(kill_at)
        dump(pid, image, leave_running=True, watchdog=wd)
        os.write(w, f"{ptrace.call_count()}\n".encode())
        return 0

    status, got = H.fork_dump(body)
    return status, got[0] if got else None, got[1] if len(got) > 1 else None


# The injected calls run as one batch (~30 ptrace calls in a whole dump of the survivor), or one by one (64
# rt_sigaction calls alone are ~256 ptrace calls): a kill or failure at each call of either way is swept.
BATCHED = pytest.mark.parametrize("batch", (True, False), ids=("batched", "one-by-one"))


def _min_calls(batch: bool) -> int:
    return 20 if batch else 250


@pytest.mark.parametrize(("batch", "prepared"), ((True, False), (False, False), (True, True)),
                         ids=("batched", "one-by-one", "batched-prepared-watchdog"))
def test_dump_killed_at_every_ptrace_call(harness: H.Harness, batch: bool, prepared: bool) -> None:
    """prepared: the watchdog was forked ahead with no target (a service worker's, api.prepare_dump) and is told
    it by the dump: it must put the original back as one the dump forks does."""
    target = harness.start_target("survivor")
    image = harness.image_dir()
    slow: list[tuple[int, float]] = []
    published: list[int] = []
    cont_seen: list[int] = []  # K at which the original's SIGCONT handler ran
    conts = 0
    k = 0
    t_start = time.monotonic()
    while True:
        k += 1
        assert k < 2000, "the dump never completed"
        status, watchdog, _ = forked_dump(target.pid, image, k, batch=batch, prepared=prepared)
        took = wait_running(target, f"dump killed at ptrace call {k}", watchdog)
        if took > RECOVER_BUDGET:
            slow.append((k, took))
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, f"the dump with no kill failed (K={k}): {target.describe()}"
            break
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"K={k}: status {status:#x}"
        assert len(tmp_dirs(image)) <= 1, f"K={k}: stale temporary directories kept: {tmp_dirs(image)}"
        if check_ok(target, k, f"dump killed at ptrace call {k}") > conts:
            conts += 1
            cont_seen.append(k)
        if image.exists():  # killed after the image was published (the final detach): the next K needs room
            published.append(k)
            shutil.rmtree(image)
    total = k - 1
    elapsed = time.monotonic() - t_start
    print(f"{total} ptrace calls, each one killed; {elapsed:.1f} s")
    # The sweep must reach through the injection.
    assert total > _min_calls(batch), f"only {total} ptrace calls: the kill hook does not see the dump's calls"
    # killed after publishing the image: only in the last few calls (detach, SIGCONT), and the original runs on
    assert published and published == list(range(published[0], total + 1)) and len(published) <= 4, (
        f"killed dumps that had published the image: {published} of {total}")
    assert not slow, f"the original took longer than {RECOVER_BUDGET} s to run again: {slow}"
    assert image.is_dir() and tmp_dirs(image) == [], f"after the complete dump: {tmp_dirs(image)}"
    # The SIGCONT that ends the dump's stop is taken away from the program; only a dump killed in the last few
    # calls, after it sent SIGCONT and before it took it, lets the kernel deliver it.
    assert check_ok(target, k, "after the complete dump") == conts, "the complete dump let SIGCONT through"
    assert all(k >= total - 3 for k in cont_seen), f"SIGCONT handler ran after kills at {cont_seen} of {total}"
    target.mark()
    target.signal(signal.SIGUSR2)
    assert target.wait_result() == "PASS", target.describe()


@BATCHED
def test_dump_failing_at_every_ptrace_call(harness: H.Harness, batch: bool) -> None:
    """The dump's own failure path (an error it survives) puts the original back at every point too, before it
    reports the error, and leaves no temporary directory."""
    target = harness.start_target("survivor")
    image = harness.image_dir()
    status, watchdog, total = forked_dump(target.pid, image, 0, batch=batch)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and total, f"a clean dump failed: {status:#x}"
    wait_running(target, "clean dump", watchdog)
    shutil.rmtree(image)
    assert total > _min_calls(batch), f"only {total} ptrace calls"
    swallowed: list[int] = []
    for k in range(1, total + 1):
        status, watchdog, _ = forked_dump(target.pid, image, k, fail=True, batch=batch)
        assert os.WIFEXITED(status), f"K={k}: status {status:#x}"
        # the original runs again by the time the dump has exited, with no wait for the watchdog
        state = H.proc_state(target.pid)
        assert state in ("S", "R") and traced_by(target.pid) == 0, f"K={k}: the original is {state} after the dump"
        wait_running(target, f"dump failing at ptrace call {k}", watchdog)
        assert tmp_dirs(image) == [], f"K={k}: {tmp_dirs(image)}"
        if os.WEXITSTATUS(status) == 0:  # a failure the dump tolerates by design (e.g. no rseq configuration)
            swallowed.append(k)
        assert image.exists() == (os.WEXITSTATUS(status) == 0), f"K={k}: exit {os.WEXITSTATUS(status)}, " \
            f"image {'published' if image.exists() else 'missing'}"
        if image.exists():
            shutil.rmtree(image)
        assert check_ok(target, k, f"dump failing at ptrace call {k}") == 0, f"K={k}: SIGCONT let through"
    # Tolerated: the last three calls (letting the original go, after the image is published) and one more:
    # dump_misc (dump/core.py) reads a failing PTRACE_GET_RSEQ_CONFIGURATION as "no rseq registered" and
    # goes on; whether it should refuse instead is outside this test.
    before_publish = [k for k in swallowed if k <= total - 3]
    assert len(before_publish) <= 1, f"failures the dump went on after: {swallowed} of {total}"
    target.mark()
    target.signal(signal.SIGUSR2)
    assert target.wait_result() == "PASS", target.describe()


def run_cli_dump(harness: H.Harness, pid: int, image: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazarus", "dump", "-t", str(pid), "-D", str(image), "--leave-running"],
        cwd=H.REPO_ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    harness.popens.append(proc)
    return proc


# A whole dump of the survivor makes ~30 ptrace calls (its injected calls batched): kills spread over them.
@pytest.mark.parametrize("kill_at", [5, 10, 15, 20])
def test_cli_dump_killed_by_env_hook(harness: H.Harness, kill_at: int) -> None:
    target = harness.start_target("survivor")
    image = harness.image_dir()
    proc = run_cli_dump(harness, target.pid, image, {"LAZARUS_TEST_KILL_AT_PTRACE": str(kill_at)})
    # stderr is shared with the watchdog: its end means the watchdog is done too
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {err}"
    wait_running(target, f"CLI dump killed at ptrace call {kill_at}")
    assert f"lazarus: watchdog: the dump of pid {target.pid} died" in err, err
    check_ok(target, 1, f"CLI dump killed at ptrace call {kill_at}")
    # the next dump to the same place removes what the killed one left, and completes
    left = tmp_dirs(image)
    assert len(left) == 1, left
    res = harness.dump(target, image, "--leave-running")
    assert res.returncode == 0, res.stderr
    assert tmp_dirs(image) == [], f"left behind: {tmp_dirs(image)}"
    wait_running(target, "after the complete dump")
    target.mark()
    target.signal(signal.SIGUSR2)
    assert target.wait_result() == "PASS", target.describe()


def test_cli_dump_killed_at_random_moments(harness: H.Harness) -> None:
    rng = random.Random(8)  # deterministic moments
    target = harness.start_target("survivor")
    for i in range(1, 21):
        image = harness.image_dir()
        proc = run_cli_dump(harness, target.pid, image, {})
        deadline = time.monotonic() + 20
        while traced_by(target.pid) == 0:
            assert proc.poll() is None, f"dump ended before it attached: {proc.communicate()}"
            assert time.monotonic() < deadline, "dump never attached"
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.03))
        proc.kill()
        _, err = proc.communicate(timeout=30)
        wait_running(target, f"dump killed at random moment {i}")
        conts = check_ok(target, i, f"dump killed at random moment {i} ({err.strip()})")
        print(f"moment {i}: {err.strip()}")
    # only a kill in the instant between the SIGCONT that ends the stop and taking it lets the handler run
    assert conts <= 2, f"the original's SIGCONT handler ran {conts} times in 20 killed dumps"
    target.mark()
    target.signal(signal.SIGUSR2)
    assert target.wait_result() == "PASS", target.describe()


def threads_running(target: H.Target, what: str) -> None:
    """Every thread of the original untraced and out of the dump's stop (T or t) within the timeout."""
    deadline = time.monotonic() + RECOVER_TIMEOUT
    while True:
        bad = []
        for tid in sorted(int(t) for t in os.listdir(f"/proc/{target.pid}/task")):
            status = Path(f"/proc/{target.pid}/task/{tid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields["State"].split()[0] in ("T", "t") or int(fields["TracerPid"]) != 0:
                bad.append(f"{tid} {fields['State'].strip()} traced by {fields['TracerPid'].strip()}")
        if not bad:
            return
        assert time.monotonic() < deadline, f"{what}: threads still stopped or traced: {bad}"
        time.sleep(0.002)


def test_threaded_dump_killed_across_the_dump(harness: H.Harness) -> None:
    """A multi-threaded original (threads.c: threads in futex waits, a read, a sleep and a user-code loop, each
    with registers it checks) survives a dump killed at ptrace calls spread over the whole dump, through the
    injections into its other threads too, and a dump failing at them: afterwards every thread passes its own
    checks."""
    case = H.CASES_BY_ID["threads"]
    target = harness.start_case(case)
    image = harness.image_dir()
    status, watchdog, total = forked_dump(target.pid, image, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and total, f"a clean dump failed: {status:#x}"
    wait_running(target, "clean dump", watchdog)
    threads_running(target, "clean dump")
    shutil.rmtree(image)
    # ~16 points spread over the whole dump, each killed and failed (~1.5 s a point on a slow VM: the sweep of
    # every call is the single-threaded tests' job; here the points cross the other threads' injections)
    step = max(1, total // 16)
    print(f"{total} ptrace calls; killing and failing at every {step}th")
    for k in range(1, total + 1, step):
        for fail in (False, True):
            what = f"dump {'failing' if fail else 'killed'} at ptrace call {k} of {total}"
            status, watchdog, _ = forked_dump(target.pid, image, k, fail=fail)
            wait_running(target, what, watchdog)
            threads_running(target, what)
            if image.exists():
                shutil.rmtree(image)
            for leftover in tmp_dirs(image):
                shutil.rmtree(image.parent / leftover)
    H.expect_pass(harness.run_case(case, target), target)


def _dump_killed_in_batch(pid: int, image: Path, moment: str) -> tuple[int, int | None]:
    """Fork a dump that SIGKILLs itself at `moment` of its batch of injected calls (remote.RemoteTask
    .run_batch_code): "running" right after it let the task run the batch (the task runs on untraced, through
    the batch's end, as the dumper dies), "ended" once the task stopped at the batch's end, before the dumper
    took that stop's signal away, "pending" there too with another SIGSTOP left pending (as when the task sent
    its own while the group stop of a dead dumper came first). Returns the child's wait status and its
    watchdog's pid."""
    def body(w: int) -> int:  # pragma: no cover - runs in the child
        from lazarus import remote as remote_mod

        real_cont, real_wait = ptrace.cont, ptrace.wait

        def cont(p: int, sig: int = 0) -> None:
            real_cont(p, sig)
            if moment == "running":
                os.kill(os.getpid(), signal.SIGKILL)

        def wait(p: int, timeout: float = 10.0) -> ptrace.WaitStatus:
            st = real_wait(p, timeout)
            if moment == "pending":
                os.kill(p, signal.SIGSTOP)
            if moment in ("ended", "pending"):
                os.kill(os.getpid(), signal.SIGKILL)
            return st

        run = remote_mod.RemoteTask.run_batch_code

        def run_batch_code(self: remote_mod.RemoteTask, *a: int) -> int:
            # only inside the batch: ptrace.cont/wait as remote.py sees them
            remote_mod.ptrace.cont, remote_mod.ptrace.wait = cont, wait  # type: ignore[assignment]
            return run(self, *a)

        remote_mod.RemoteTask.run_batch_code = run_batch_code  # type: ignore[method-assign]
        dump(pid, image, leave_running=True)
        return 1  # the dump got past its batch without being killed: the parent fails the test

    status, got = H.fork_dump(body)
    return status, got[0] if got else None


@pytest.mark.parametrize("moment", ["running", "ended", "pending"])
def test_dump_killed_while_its_batch_runs(harness: H.Harness, moment: str) -> None:
    """The dump killed while the original runs the batch of injected calls or stands at its end: the original
    stops in the group stop (never meets a trap or signal of ours untraced), the watchdog puts it back, and it
    passes its checks, 10 times in a row (the task's progress through the batch at the kill varies)."""
    target = harness.start_target("survivor")
    image = harness.image_dir()
    for i in range(1, 11):
        status, watchdog = _dump_killed_in_batch(target.pid, image, moment)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"{moment} {i}: the dump was not killed in its batch (status {status:#x})"
        what = f"dump killed with its batch {moment} ({i})"
        wait_running(target, what, watchdog)
        assert check_ok(target, i, what) == 0, f"{what}: SIGCONT let through"
        assert not image.exists()
        for leftover in tmp_dirs(image):
            shutil.rmtree(image.parent / leftover)
    target.mark()
    target.signal(signal.SIGUSR2)
    assert target.wait_result() == "PASS", target.describe()


def test_batched_dump_keeps_an_ignored_and_pending_sigtrap(harness: H.Harness) -> None:
    """The dump's batch ends in a SIGSTOP, not a trap, so it also batches in a process whose SIGTRAP is ignored
    and pending (blocked): the disposition, the mask and the pending SIGTRAP are as they were afterwards."""
    code = ("import os, signal, sys, time\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTRAP})\n"
            "signal.signal(signal.SIGTRAP, signal.SIG_IGN)\n"
            "os.kill(os.getpid(), signal.SIGTRAP)\n"
            "print('READY', flush=True)\n"
            "time.sleep(60)\n")
    image = harness.image_dir()
    log_path = image.parent / "sigtrap.log"
    with open(log_path, "w") as log:  # a file, not a pipe: a pipe to another process is refused
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stdin=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
    harness.popens.append(proc)
    try:
        deadline = time.monotonic() + 10
        while "READY" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        fields = ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")

        def sig_status() -> dict[str, str]:
            lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            return {k: v.strip() for k, v in (ln.split(":", 1) for ln in lines) if k in fields}

        before = sig_status()
        trap = 1 << (signal.SIGTRAP - 1)
        assert int(before["SigIgn"], 16) & trap and int(before["ShdPnd"], 16) & trap, before
        status, watchdog, total = forked_dump(proc.pid, image, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and total, f"the dump failed: {status:#x}"
        assert total < 100, f"{total} ptrace calls: the injected calls were not batched"
        assert watchdog is None or H.reap(watchdog, RECOVER_TIMEOUT) is not None
        deadline = time.monotonic() + RECOVER_TIMEOUT
        while H.proc_state(proc.pid) not in ("S", "R") or traced_by(proc.pid):
            assert time.monotonic() < deadline, f"pid {proc.pid} is {H.proc_state(proc.pid)} after the dump"
            time.sleep(0.002)
        assert sig_status() == before
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=10)


def pending_conts(pid: int) -> list[tuple[str, int, int, int]]:
    """(queue, si_code, si_pid, si_value) of each SIGCONT queued in `pid`: its process queue ("process") and each
    thread's ("thread" for the main thread, "thread 2", ... for the others by tid order), read through ptrace
    (seize, interrupt, peek, detach: no signal is generated, nothing changes)."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    out = []
    for n, tid in enumerate([pid, *(t for t in tids if t != pid)]):
        ptrace.seize(tid, 0)
        try:
            ptrace.interrupt(tid)
            st = ptrace.wait(tid)
            assert st.stopped, f"tid {tid}: {st}"
            queues = [("thread" if n == 0 else f"thread {n + 1}", False)] + ([("process", True)] if n == 0 else [])
            for queue, shared in queues:
                for info in ptrace.peek_siginfo(tid, shared):
                    signo, _, code = (int.from_bytes(info[k:k + 4], "little", signed=True) for k in (0, 4, 8))
                    if signo == signal.SIGCONT:
                        out.append((queue, code, int.from_bytes(info[16:20], "little"),
                                    int.from_bytes(info[24:28], "little")))
        finally:
            ptrace.detach(tid)
    return out


@pytest.mark.parametrize("how", ("fail", "kill"))
@pytest.mark.parametrize("mode", ("pending", "none", "thread"))
def test_blocked_sigcont_kept_when_the_dump_fails_or_dies(harness: H.Harness, how: str, mode: str) -> None:
    """A blocked SIGCONT pending in the original (sigcont.c: one on the process queue, one on the thread queue)
    (mode "thread": and one on a second thread's queue, which the target's own final check asks for) is still
    pending with its siginfo after a dump that fails, or is killed, at each of its ptrace calls, and
    after a complete --leave-running dump; with none pending, none is (the SIGCONT ending the dump's stop is not
    left behind). The dump's SIGSTOP would have discarded them (dump/sigcont.py)."""
    target = harness.start_target("sigcont", *((mode,) if mode != "pending" else ()))
    want = pending_conts(target.pid)
    pid = target.pid
    assert want == ([] if mode == "none" else [("thread", -6, pid, 0), ("process", -1, pid, 4711)]
                    + ([("thread 2", -6, pid, 0)] if mode == "thread" else [])), want
    image = harness.image_dir()
    status, watchdog, total = forked_dump(pid, image, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and total, f"a clean dump failed: {status:#x}"
    wait_running(target, "clean dump", watchdog)
    assert pending_conts(pid) == want, "after a complete --leave-running dump"
    shutil.rmtree(image)
    for k in range(1, total + 1):
        status, watchdog, _ = forked_dump(pid, image, k, fail=how == "fail")
        wait_running(target, f"dump {how}ing at ptrace call {k}", watchdog)
        assert pending_conts(pid) == want, f"K={k} of {total} ({how})"
        if image.exists():
            shutil.rmtree(image)
        for d in tmp_dirs(image):
            shutil.rmtree(image.parent / d)
    target.mark()
    target.signal(signal.SIGUSR2)
    assert target.wait_result() == "PASS", target.describe()
