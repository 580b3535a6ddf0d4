"""Parsers of /proc/PID/cgroup and the cgroup lines of /proc/self/mountinfo, on text from a v1+v2 machine."""

from __future__ import annotations

from lazarus.kernel import cgroups

CGROUP = """9:name=systemd:/
8:pids:/lazarus-test
4:memory:/process_api/032c
0::/lazarus-test
"""

MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/cpu\\040acct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
35 30 0:29 /sub /mnt/pids-bind rw - cgroup cgroup rw,pids
"""


def test_parse_cgroup() -> None:
    got = cgroups.parse_cgroup(CGROUP)
    assert [(m.hierarchy, m.controllers, m.path) for m in got] == [
        (9, "name=systemd", "/"), (8, "pids", "/lazarus-test"), (4, "memory", "/process_api/032c"),
        (0, "", "/lazarus-test")]


def test_parse_mounts_and_dirs() -> None:
    mounts = cgroups.parse_mounts(MOUNTINFO)
    assert mounts == {(0, ""): "/sys/fs/cgroup/unified", (-1, "name=systemd"): "/sys/fs/cgroup/systemd",
                      (-1, "pids"): "/sys/fs/cgroup/pids", (-1, "cpu,cpuacct"): "/sys/fs/cgroup/cpu acct"}
    got = [cgroups.cgroup_dir(m, mounts) for m in cgroups.parse_cgroup(CGROUP)]
    assert got == ["/sys/fs/cgroup/systemd/", "/sys/fs/cgroup/pids/lazarus-test", None,
                   "/sys/fs/cgroup/unified/lazarus-test"]
