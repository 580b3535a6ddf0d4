"""procfs parsers on fixture text captured on a 6.18 kernel, plus the readers on this test's own process."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lazarus.errors import KernelError, NoSuchTask
from lazarus.kernel import abi, procfs

FIX = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIX / name).read_text()


def by_path(vmas: list[procfs.Vma], path: str) -> list[procfs.Vma]:
    return [v for v in vmas if v.path == path]


# ---------------------------------------------------------------------------------------------
# maps


@pytest.fixture(scope="module")
def maps() -> list[procfs.Vma]:
    return procfs.parse_maps(fixture("maps.txt"))


def test_maps_count_and_order(maps: list[procfs.Vma]) -> None:
    assert len(maps) == len(fixture("maps.txt").splitlines())
    assert all(a.end <= b.start for a, b in zip(maps, maps[1:], strict=False))


def test_maps_file_with_spaces_and_parens(maps: list[procfs.Vma]) -> None:
    (v,) = by_path(maps, "/tmp/fx/my file (v2).bin")
    assert (v.start, v.end) == (0x7FA7A6058000, 0x7FA7A605C000)
    assert v.prot == abi.PROT_READ | abi.PROT_WRITE
    assert not v.shared and not v.deleted
    assert v.dev == (0xFE, 0) and v.inode == 2155970 and v.pgoff == 0
    assert v.is_file_private and v.is_file
    assert not (v.is_anon_private or v.is_shared_anon or v.is_memfd or v.is_special)
    assert v.npages == 4 and v.size == 4 * 4096


def test_maps_pgoff_and_exec(maps: list[procfs.Vma]) -> None:
    text = [v for v in maps if v.path.endswith("python3.11")]
    assert text[1].pgoff == 0x1000 and text[1].offset == 0x1000
    assert text[1].prot == abi.PROT_READ | abi.PROT_EXEC


def test_maps_deleted(maps: list[procfs.Vma]) -> None:
    (gone,) = by_path(maps, "/tmp/fx/gone.bin")
    assert gone.deleted and gone.shared and gone.is_file and not gone.is_shared_anon
    # only a trailing " (deleted)" is the kernel's marker
    (odd,) = by_path(maps, "/tmp/odd (deleted) name.txt")
    assert odd.deleted and odd.pgoff == 0x1000 and odd.is_file_private


def test_maps_escaped_newline_is_kept_raw(maps: list[procfs.Vma]) -> None:
    assert by_path(maps, "/tmp/new\\012line")


def test_maps_memfd(maps: list[procfs.Vma]) -> None:
    (v,) = by_path(maps, "/memfd:my memfd")
    assert v.is_memfd and v.deleted and v.shared and v.is_file
    assert not v.is_shared_anon and not v.is_anon_private


def test_maps_shared_anon_and_sysv(maps: list[procfs.Vma]) -> None:
    zero = by_path(maps, "/dev/zero")
    shared = [v for v in zero if v.shared]
    private = [v for v in zero if not v.shared]
    assert len(shared) == 3 and all(v.deleted and v.is_shared_anon and not v.is_file for v in shared)
    # a private /dev/zero mapping is anonymous memory under a file's name
    (p,) = private
    assert p.is_anon_private and not p.is_file_private and not p.deleted
    (sysv,) = [v for v in maps if v.path.startswith("/SYSV")]
    assert sysv.path == "/SYSV00000000" and sysv.deleted and sysv.is_shared_anon and sysv.is_sysv_shm


def test_maps_anonymous_and_named(maps: list[procfs.Vma]) -> None:
    anon = by_path(maps, "")
    assert anon and all(v.is_anon_private and v.inode == 0 and v.dev == (0, 0) for v in anon)
    (heap,) = by_path(maps, "[heap]")
    (stack,) = by_path(maps, "[stack]")
    assert heap.is_anon_private and stack.is_anon_private
    (named,) = by_path(maps, "[anon:lazarus test]")
    assert named.is_anon_private and named.anon_name == "lazarus test"
    (shm,) = by_path(maps, "[anon_shmem:shared one]")
    assert shm.is_shared_anon and shm.anon_name == "shared one" and not shm.is_anon_private
    assert heap.anon_name is None


def test_maps_special(maps: list[procfs.Vma]) -> None:
    special = [v for v in maps if v.is_special]
    assert [v.path for v in special] == ["[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"]
    assert all(not v.is_anon_private and not v.is_file_private for v in special)
    vsyscall = special[-1]
    assert vsyscall.start == 0xFFFFFFFFFF600000 and vsyscall.prot == abi.PROT_EXEC
    vdso = special[2]
    assert vdso.prot == abi.PROT_READ | abi.PROT_EXEC and vdso.npages == 2


def test_maps_bad_line() -> None:
    with pytest.raises(ValueError):
        procfs.parse_maps("nonsense\n")


# ---------------------------------------------------------------------------------------------
# smaps


def test_smaps_flags_and_rss() -> None:
    vmas = procfs.parse_smaps(fixture("smaps.txt"))
    assert len(vmas) == 12
    (heap,) = by_path(vmas, "[heap]")
    assert heap.vmflags == {"rd", "wr", "mr", "mw", "me", "ac"}
    assert heap.rss == 1268 * 1024
    (stack,) = by_path(vmas, "[stack]")
    assert "gd" in stack.vmflags
    (vvar,) = by_path(vmas, "[vvar]")
    assert {"pf", "io", "dd"} <= vvar.vmflags
    (vsyscall,) = by_path(vmas, "[vsyscall]")
    assert vsyscall.vmflags == {"ex"}
    (memfd,) = by_path(vmas, "/memfd:my memfd")
    assert "sh" in memfd.vmflags and memfd.deleted


def test_smaps_headers_match_maps() -> None:
    maps = {(v.start, v.end): v for v in procfs.parse_maps(fixture("maps.txt"))}
    for v in procfs.parse_smaps(fixture("smaps.txt")):
        m = maps[(v.start, v.end)]
        assert (v.prot, v.shared, v.pgoff, v.dev, v.inode, v.path, v.deleted) == (
            m.prot, m.shared, m.pgoff, m.dev, m.inode, m.path, m.deleted)


def test_smaps_without_vmflags() -> None:
    text = "\n".join(line for line in fixture("smaps.txt").splitlines() if not line.startswith("VmFlags"))
    vmas = procfs.parse_smaps(text + "\n")
    assert len(vmas) == 12 and all(not v.vmflags for v in vmas)
    assert by_path(vmas, "[heap]")[0].rss == 1268 * 1024


def test_smaps_empty() -> None:
    assert procfs.parse_smaps("") == [] and procfs.parse_maps("") == []


# ---------------------------------------------------------------------------------------------
# status, stat


def test_status() -> None:
    st = procfs.parse_status(fixture("status.txt"))
    assert st.name == "python" and st.state == "R"
    assert (st.tgid, st.pid, st.ppid, st.tracer_pid) == (7959, 7959, 7958, 0)
    assert st.uids == (1, 2, 3, 2) and st.gids == (5, 6, 7, 6)
    assert st.groups == (10, 20, 1000)
    assert st.umask == 0o027
    assert st.threads == 1
    assert st.nspid == (7959, 1) and st.nstgid == (7959, 1) and st.nspgid == (7955, 0)
    usr1, usr2, term, hup = (1 << (s - 1) for s in (abi.SIGUSR1, abi.SIGUSR2, abi.SIGTERM, abi.SIGHUP))
    assert st.sig_blk == usr1 | term
    assert st.shd_pnd == usr1 and st.sig_pnd == 0
    assert st.sig_ign & hup and st.sig_cgt & usr2
    assert st.no_new_privs and st.seccomp == 0 and st.kthread is False
    assert st.cap_eff == 0 and st.cap_bnd == 0x1FFFEFFFFFF
    assert st.fields["Cpus_allowed_list"] == "0-1"


def test_stat_comm_with_parens() -> None:
    st = procfs.parse_stat(fixture("stat_parens.txt"))
    assert st.comm == "x) (y) z("
    assert st.pid == 4750 and st.state == "R" and st.ppid == 4748
    assert (st.pgrp, st.session, st.tty_nr, st.tpgid) == (4748, 2309, 0, -1)
    assert st.flags == 4194304 and not st.is_kernel_thread
    assert st.num_threads == 1 and st.starttime == 49113
    assert st.start_code == 94347861438464 and st.end_code == 94347861438805
    assert st.start_stack == 140736783314176
    assert (st.start_data, st.end_data, st.start_brk) == (94347861450160, 94347861450776, 94348012068864)
    assert (st.arg_start, st.arg_end) == (140736783317715, 140736783317734)
    assert (st.env_start, st.env_end) == (140736783317734, 140736783319015)
    assert st.exit_signal == abi.SIGCHLD and st.exit_code == 0


def test_stat_kernel_thread() -> None:
    st = procfs.parse_stat(fixture("stat_kthread.txt"))
    assert st.comm == "kthreadd" and st.is_kernel_thread and st.ppid == 0


def test_stat_garbage() -> None:
    with pytest.raises(ValueError):
        procfs.parse_stat("12 no parens")


# ---------------------------------------------------------------------------------------------
# fdinfo and small files


def test_fdinfo_file() -> None:
    fi = procfs.parse_fdinfo(fixture("fdinfo_file.txt"))
    assert fi.pos == 0 and fi.mnt_id == 27 and fi.ino == 2155970
    assert fi.flags == 0o2100002
    assert fi.flags & abi.O_ACCMODE == abi.O_RDWR and fi.flags & abi.O_CLOEXEC and fi.flags & abi.O_LARGEFILE
    assert fi.uffd_features is None and fi.extra == ()


def test_fdinfo_uffd() -> None:
    fi = procfs.parse_fdinfo(fixture("fdinfo_uffd.txt"))
    assert fi.flags & abi.O_NONBLOCK
    assert fi.uffd_features == abi.UFFD_FEATURE_EVENT_FORK | abi.UFFD_FEATURE_EVENT_UNMAP
    assert fi.get("pending") == "0"


def test_fdinfo_epoll_repeats() -> None:
    fi = procfs.parse_fdinfo(fixture("fdinfo_epoll.txt"))
    tfds = fi.get_all("tfd")
    assert len(tfds) == 2 and tfds[0].startswith("15 events:")


def test_auxv_and_personality() -> None:
    data = struct.pack("<6Q", 6, 4096, 25, 0x7FFF0000, 0, 0) + b"\0" * 16
    assert procfs.parse_auxv(data) == [(6, 4096), (25, 0x7FFF0000)]
    assert procfs.parse_personality("00400000\n") == 0x400000


# ---------------------------------------------------------------------------------------------
# readers, on this process and a child of it


def test_readers_on_self() -> None:
    me = os.getpid()
    vmas = procfs.read_smaps(me)
    assert any(v.path == "[stack]" for v in vmas) and all(v.rss is not None for v in vmas)
    assert [(v.start, v.path) for v in procfs.read_maps(me)][:3] == [(v.start, v.path) for v in vmas][:3]
    st = procfs.read_status(me)
    assert st.pid == me and st.threads >= 1
    stat = procfs.read_stat(me)
    assert stat.pid == me and stat.ppid == os.getppid() and not stat.is_kernel_thread
    assert procfs.start_time(me) == stat.starttime
    assert me in procfs.tasks(me)
    assert procfs.read_stat(me, me).pid == me
    assert procfs.read_cwd(me) == os.getcwd()
    assert os.path.realpath(procfs.read_exe(me)) == os.path.realpath(sys.executable)
    assert procfs.read_comm(me) == Path(f"/proc/{me}/comm").read_text().rstrip("\n")
    assert procfs.parse_auxv(procfs.read_auxv(me))
    assert procfs.read_personality(me) >= 0


def test_fds_and_fdinfo_on_self() -> None:
    r, w = os.pipe()
    try:
        fds = procfs.list_fds(os.getpid())
        assert fds[r].startswith("pipe:[") and fds[r] == fds[w]
        assert procfs.read_fdinfo(os.getpid(), w).flags & abi.O_ACCMODE == abi.O_WRONLY
    finally:
        os.close(r)
        os.close(w)


def test_children_and_missing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert child.pid in procfs.children(os.getpid())
        assert procfs.read_stat(child.pid).ppid == os.getpid()
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()
    with pytest.raises(NoSuchTask, match=f"no such process {child.pid}"):
        procfs.read_status(child.pid)
    with pytest.raises(NoSuchTask):
        procfs.list_fds(child.pid)


def test_missing_file_of_live_process_is_not_no_such_task() -> None:
    with pytest.raises(KernelError) as ei:
        procfs.read_fdinfo(os.getpid(), 987654)
    assert not isinstance(ei.value, NoSuchTask)
    assert ei.value.errno == 2


def test_kernel_thread() -> None:
    if not os.path.exists("/proc/2/stat"):
        pytest.skip("no pid 2 visible")
    assert procfs.is_kernel_thread(2) == (procfs.read_comm(2) == "kthreadd")


# ---------------------------------------------------------------------------------------------
# locks and mounts

# fdinfo text captured on 6.18: a flock, two POSIX record locks and an OFD lock (fs/locks.c lock_get_status).
FDINFO_LOCKS = """pos:\t0
flags:\t02100002
mnt_id:\t27
ino:\t2146417
lock:\t1: POSIX  ADVISORY  READ 14252 fe:00:2146417 5 14
lock:\t2: POSIX  ADVISORY  WRITE 14252 fe:00:2146417 30 EOF
lock:\t3: FLOCK  ADVISORY  WRITE 14252 fe:00:2146417 0 EOF
lock:\t4: OFDLCK ADVISORY  READ -1 fe:00:2146417 3 EOF
"""


def test_lock_lines() -> None:
    info = procfs.parse_fdinfo(FDINFO_LOCKS)
    locks = [procfs.parse_lock(line) for line in procfs.fd_locks(info)]
    assert locks == [
        procfs.FileLock("POSIX", "READ", 14252, 2146417, 5, 14),
        procfs.FileLock("POSIX", "WRITE", 14252, 2146417, 30, None),
        procfs.FileLock("FLOCK", "WRITE", 14252, 2146417, 0, None),
        procfs.FileLock("OFDLCK", "READ", -1, 2146417, 3, None),
    ]
    assert info.flags == 0o2100002 and info.pos == 0


def test_lease_lines_are_not_taken_for_locks() -> None:
    # A lease shows its state where a lock says ADVISORY: a caller must refuse it, not misread it.
    with pytest.raises(ValueError):
        procfs.parse_lock("1: LEASE  ACTIVE    READ 14252 fe:00:2146417 0 EOF")
    with pytest.raises(ValueError):
        procfs.parse_lock("garbage")


def test_mount_points() -> None:
    text = ("22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
            "27 22 0:5 / /mnt/with\\040space rw - tmpfs tmpfs rw\n")
    assert procfs.parse_mount_points(text) == {22: "/", 27: "/mnt/with space"}
    assert "/" in procfs.read_mount_points(os.getpid()).values()


def test_fstype_of_device_from_mountinfo() -> None:
    text = ("22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
            "25 22 0:21 / /dev/shm rw,nosuid,nodev shared:3 - tmpfs tmpfs rw\n"
            "30 22 0:45 / /mnt/with\\040space rw - xfs /dev/vdb rw\n"
            "31 22 0:46 / /opt rw shared:7 master:2 - btrfs /dev/vdc rw\n")
    assert procfs.parse_fstype_of_device(text, os.makedev(259, 1)) == "ext4"
    assert procfs.parse_fstype_of_device(text, os.makedev(0, 21)) == "tmpfs"
    assert procfs.parse_fstype_of_device(text, os.makedev(0, 45)) == "xfs"
    assert procfs.parse_fstype_of_device(text, os.makedev(0, 46)) == "btrfs"
    assert procfs.parse_fstype_of_device(text, os.makedev(0, 99)) is None  # not mounted (a btrfs subvolume's)
    assert procfs.parse_fstype_of_device(text, os.makedev(1, 259)) is None  # major and minor not swapped


def test_fstype_of_this_machine_s_root() -> None:
    st = os.stat("/")
    with open("/proc/self/mountinfo") as f:
        rows = [line.split(" - ")[1].split()[0] for line in f
                if line.split()[2] == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"]
    assert procfs.fstype_of("/") in rows
    assert procfs.fstype_of("/no/such/path") is None
