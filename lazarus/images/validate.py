"""Semantic validation of a task record: every number in range and consistent with the others.

Checksums prove that an image is the one that was written, not that whoever wrote it meant well: a tool that
recomputes them can put anything in a task file. So before any task exists, eager and lazy restore alike run
`check_task` over each task, and refuse the image with one line naming the file and field:

    vmas       page aligned, start < end, inside the user address space above mmap_min_addr, sorted, not
               overlapping
    page runs  [vaddr, npages, index]: npages > 0, inside their vma, inside the page file, no two runs
               covering one address or one file page, and together every page of the page file
    objects    runs [offset, npages, index] inside the object's size and the page file
    fds        0 <= fd < 2^20, each once; flags and positions in range; pipe sizes within what the kernel
               allows unprivileged; paths absolute; blobs named by the record present in the image; a
               "proc_self" file under /proc/PID of the task itself; recreated files (unlinked files, deleted
               FIFOs, directories and cwd, deleted mapped files, memfds) with a mode <= 0o7777 and no setuid or
               setgid bit the restored credentials could not have set themselves
    signals    64 actions of four u64, masks u64, itimers non-negative
    misc       umask <= 0o7777, creds 4 u32 each, absolute cwd, 16 rlimits

Fields added by later capabilities are checked where they are used, with the same one-line errors. Pure
Python, no syscalls, like the rest of this package.
"""

from __future__ import annotations

import bisect
import operator
import os
import stat
from collections.abc import Callable

from lazarus.errors import ImageError
from lazarus.images.format import (
    CGROUP_SCHEMA,
    FD_SCHEMA,
    OBJECT_SCHEMA,
    TASK_FIELDS_SCHEMA,
    VMA_SCHEMA,
    blob_name,
    check_schema,
    pages_parts,
    task_name,
)
from lazarus.images.shared import SHARED_JSON, check_shared, check_shared_memory

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

PAGE_SIZE = 4096
USER_TOP = 0x7FFF_FFFF_F000 + PAGE_SIZE  # TASK_SIZE on x86-64 with 4-level paging (the vsyscall page is not a vma)
# vm.mmap_min_addr's usual value: a process without CAP_SYS_RAWIO cannot map below it, and a restore (as root,
# which can) must not put a mapping there on an image's say-so.
MMAP_MIN = 0x10000
U64 = (1 << 64) - 1
_MAX_RUN = U64 // PAGE_SIZE
_PAGE_MASK = PAGE_SIZE - 1
U32 = (1 << 32) - 1
FD_MAX = 1 << 20  # fs.nr_open's ceiling
PIPE_MAX = 1 << 20  # fs.pipe-max-size: what a restorer without CAP_SYS_RESOURCE may ask for
NSIG = 64


class _Checker:
    def __init__(self, fname: str) -> None:
        self.fname = fname

    def fail(self, field: str, why: str) -> ImageError:
        return ImageError(f"{self.fname}: field '{field}' {why}")

    def int_in(self, value: object, lo: int, hi: int, field: str) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise self.fail(field, f"must be an integer in [{lo}, {hi}], not {value!r}")
        return value

    def aligned(self, value: object, field: str, lo: int = 0, hi: int = USER_TOP) -> int:
        v = self.int_in(value, lo, hi, field)
        if v % PAGE_SIZE:
            raise self.fail(field, f"must be page aligned, not {v:#x}")
        return v

    def path(self, value: object, field: str) -> str:
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 4096:
            raise self.fail(field, f"must be an absolute path, not {value!r}")
        return value

    def triples(self, value: object, field: str) -> list[tuple[int, int, int]]:
        if not isinstance(value, list):
            raise self.fail(field, "must be an array of [address, npages, file page] runs")
        # Thousands of runs per task (a tree's child that rewrote scattered pages): checked in two passes over
        # the whole list; the run-by-run loop below only finds which one to name.
        if all(type(run) is list and len(run) == 3 for run in value):
            out = [(a, n, idx) for a, n, idx in value]
            if all(type(a) is int and type(n) is int and type(idx) is int and 0 <= a <= U64
                   and 1 <= n <= _MAX_RUN and 0 <= idx <= U64 for a, n, idx in out):
                return out
        out = []
        for i, run in enumerate(value):
            if not isinstance(run, list) or len(run) != 3:
                raise self.fail(f"{field}[{i}]", "must be [address, npages, file page]")
            a = self.int_in(run[0], 0, U64, f"{field}[{i}][0]")
            n = self.int_in(run[1], 1, U64 // PAGE_SIZE, f"{field}[{i}][1]")
            idx = self.int_in(run[2], 0, U64, f"{field}[{i}][2]")
            out.append((a, n, idx))
        return out


def _runs_in_order(vmas: list[dict[str, Any]], objects: list[dict[str, Any]], npages: int) -> int:
    """The pages a task's runs cover, if every run is well formed and where it may be, checked in one pass of
    C-level maps per list (a tree's child has thousands of runs): each vma's runs [address, npages, file page]
    page aligned, in address order without overlap, inside the vma; each object's within its size; and every
    run's file pages after the previous run's (vmas, then objects, as the dump writes them), inside the page
    file. 0 when any of it does not hold, or no page at all: the run-by-run checks then decide, and name the
    field (an image merely written in another order passes them too)."""
    file_end = covered = 0
    lists = [(v["pages"], v["start"], v["end"]) for v in vmas]
    for o in objects:
        size = o["size"]
        if type(size) is not int or size < 0:
            return 0
        lists.append((o["pages"], 0, -(-size // PAGE_SIZE) * PAGE_SIZE))
    for runs, lo, hi in lists:
        if type(runs) is not list or type(lo) is not int or type(hi) is not int:
            return 0
        if not runs:
            continue
        if set(map(type, runs)) != {list}:
            return 0
        try:  # a run of another length: zip or the unpacking raises
            addrs, counts, idxs = zip(*runs, strict=True)
        except ValueError:
            return 0
        if set(map(type, addrs)) | set(map(type, counts)) | set(map(type, idxs)) != {int}:
            return 0
        if min(counts) < 1 or any(map(_PAGE_MASK.__and__, addrs)) or addrs[0] < lo or idxs[0] < file_end:
            return 0
        ends = list(map(operator.add, addrs, map(PAGE_SIZE.__mul__, counts)))
        file_ends = list(map(operator.add, idxs, counts))
        if ends[-1] > hi or not all(map(operator.le, ends, addrs[1:])) \
                or not all(map(operator.le, file_ends, idxs[1:])):
            return 0
        file_end = file_ends[-1]
        covered += sum(counts)
    return covered if file_end <= npages else 0


def _no_overlap(runs: list[tuple[int, int, tuple[str, int, int]]], c: _Checker, what: str) -> None:
    """runs: (first, count, (list, i, j): the field LIST[i].pages[j]); refuse two that share a unit."""
    runs.sort()
    for (a, n, fa), (b, _m, fb) in zip(runs, runs[1:], strict=False):
        if b < a + n:
            raise c.fail(_run_field(fb), f"overlaps {_run_field(fa)} ({what})")


def _run_field(where: tuple[str, int, int]) -> str:
    return f"{where[0]}[{where[1]}].pages[{where[2]}]"


def _recreated_mode(c: _Checker, f: str, rec: dict[str, Any], creds: dict[str, Any], *, is_dir: bool) -> None:
    """A file the restore recreates is given the mode and owner its record says: never a setuid or setgid
    file that the restored credentials could not have made themselves (an unlinked setuid-root executable
    held by an unprivileged process would be root for it, through fexecve). Directories may keep setgid."""
    mode = c.int_in(rec["mode"], 0, 0o7777, f + ".mode")
    uids, gids = creds.get("uids", []), creds.get("gids", [])
    if 0 in uids[:3]:
        return  # root, or a process that may become root again: it could make any such file
    if mode & 0o4000 and rec.get("uid") not in uids[:3]:
        raise c.fail(f + ".mode", f"is setuid ({mode:04o}) for uid {rec.get('uid')}, which the restored "
                     f"process (uids {'/'.join(map(str, uids[:3]))}) could not make")
    if mode & 0o2000 and not is_dir and rec.get("gid") not in [*gids[:3], *creds.get("groups", [])]:
        raise c.fail(f + ".mode", f"is setgid ({mode:04o}) for gid {rec.get('gid')}, which the restored "
                     f"process (gids {'/'.join(map(str, gids[:3]))}) could not make")


def check_task(task: dict[str, Any], fname: str, npages: int, has_blob: Callable[[str], bool],
               pid: int | None = None) -> None:
    """Raise ImageError naming the first field of `task` that is out of range or inconsistent.

    npages: the number of pages in the task's page file (0 if it has none); has_blob(name): whether the image
    holds blob `name`. The record's shape (keys and types) was checked already (check_task_fields).
    """
    c = _Checker(fname)
    mm = task["mm"]
    file_runs: list[tuple[int, int, tuple[str, int, int]]] = []

    vmas = mm["vmas"]
    # Most images pass the page runs' checks in one pass of C-level maps (_runs_in_order); only one that does
    # not (out of order, or wrong) takes the run-by-run checks below, which name the field.
    in_order = _runs_in_order(vmas, mm["objects"], npages)
    prev_end, prev = 0, ""
    addr_runs: list[tuple[int, int, tuple[str, int, int]]] = []
    for i, v in enumerate(vmas):
        f = f"mm.vmas[{i}]"
        start = c.aligned(v["start"], f + ".start", MMAP_MIN)
        end = c.aligned(v["end"], f + ".end")
        if end <= start:
            raise c.fail(f + ".end", f"must be above start ({end:#x} <= {start:#x})")
        if start < prev_end:
            raise c.fail(f + ".start", f"overlaps {prev} or is out of order ({start:#x} < {prev_end:#x})")
        prev_end, prev = end, f
        c.int_in(v["prot"], 0, 7, f + ".prot")
        c.int_in(v["offset"], 0, 1 << 62, f + ".offset")
        if v["kind"] == "file":
            c.path(v["path"], f + ".path")
        if in_order:
            continue
        runs = c.triples(v["pages"], f + ".pages")
        if not all(a % PAGE_SIZE == 0 and start <= a and a + n * PAGE_SIZE <= end and idx + n <= npages
                   for a, n, idx in runs):
            for j, (a, n, idx) in enumerate(runs):  # which one
                if a % PAGE_SIZE or a < start or a + n * PAGE_SIZE > end:
                    raise c.fail(f"{f}.pages[{j}]", f"run {a:#x}+{n} pages lies outside its vma "
                                 f"{start:#x}-{end:#x}")
                if idx + n > npages:
                    raise c.fail(f"{f}.pages[{j}]", f"run reaches file page {idx + n}, past the page file's "
                                 f"{npages}")
        # the field is named only should a run overlap another (a task may have thousands of runs)
        addr_runs += [(a // PAGE_SIZE, n, ("mm.vmas", i, j)) for j, (a, n, _) in enumerate(runs)]
        file_runs += [(idx, n, ("mm.vmas", i, j)) for j, (_, n, idx) in enumerate(runs)]
    _no_overlap(addr_runs, c, "two runs for one address")

    for i, o in enumerate(mm["objects"]):
        f = f"mm.objects[{i}]"
        size = c.int_in(o["size"], 0, 1 << 46, f + ".size")
        if in_order:
            continue
        for j, (off, n, idx) in enumerate(c.triples(o["pages"], f + ".pages")):
            if off % PAGE_SIZE or off + n * PAGE_SIZE > -(-size // PAGE_SIZE) * PAGE_SIZE:
                raise c.fail(f"{f}.pages[{j}]", f"run at offset {off}+{n} pages lies outside the object's {size} "
                             "bytes")
            if idx + n > npages:
                raise c.fail(f"{f}.pages[{j}]", f"run reaches file page {idx + n}, past the page file's {npages}")
            file_runs.append((idx, n, ("mm.objects", i, j)))
    _no_overlap(file_runs, c, "two runs for one file page")
    covered = in_order if in_order else sum(n for _, n, _ in file_runs)
    if covered != npages:
        # The writer stores exactly the pages the runs name: a run cut short would leave data unused and its
        # addresses zero-filled.
        raise ImageError(f"{fname}: the page runs cover {covered} pages of the page file's {npages}")
    for key in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
                "arg_start", "arg_end", "env_start", "env_end"):
        c.int_in(mm[key], 0, USER_TOP, f"mm.{key}")
    c.path(mm["exe"], "mm.exe")

    seen: dict[int, str] = {}
    for i, rec in enumerate(task["files"]):
        f = f"files[{i}]"
        fd = c.int_in(rec["fd"], 0, FD_MAX - 1, f + ".fd")
        if fd in seen:
            raise c.fail(f + ".fd", f"repeats fd {fd} of {seen[fd]}")
        seen[fd] = f
        c.int_in(rec["flags"], 0, U32, f + ".flags")
        c.int_in(rec["pos"], 0, (1 << 63) - 1, f + ".pos")
        if "path" in rec and rec.get("type") in ("file", "dev", "fifo", "ghost"):
            c.path(rec["path"], f + ".path")
        if "pipe_size" in rec:
            c.int_in(rec["pipe_size"], PAGE_SIZE, PIPE_MAX, f + ".pipe_size")
        for key in ("data",):
            name = rec.get(key)
            if name is not None and (not isinstance(name, str) or not has_blob(name)):
                raise c.fail(f"{f}.{key}", f"names blob {name!r}, which the image does not hold")
        if "dup_of" in rec:
            c.int_in(rec["dup_of"], 0, FD_MAX - 1, f + ".dup_of")
        if rec.get("proc_self") is True and pid is not None:
            # Such a file is not looked for before the task exists: it must be the task's own /proc file.
            p = rec.get("path")
            if not isinstance(p, str) or not (p == f"/proc/{pid}" or p.startswith(f"/proc/{pid}/")):
                raise c.fail(f + ".path", f"must be a /proc/{pid} file of the task itself, not {p!r}")
        if rec.get("type") in ("ghost", "fifo") and "mode" in rec:
            _recreated_mode(c, f, rec, task["misc"]["creds"], is_dir=rec.get("dir") is True)
    for i, o in enumerate(mm["objects"]):
        if o.get("kind") in ("deleted", "memfd") and "mode" in o:
            _recreated_mode(c, f"mm.objects[{i}]", o, task["misc"]["creds"], is_dir=False)
    gone = task["misc"].get("cwd_deleted")
    if isinstance(gone, dict) and "mode" in gone:
        _recreated_mode(c, "misc.cwd_deleted", gone, task["misc"]["creds"], is_dir=True)
    for i, rec in enumerate(task["files"]):
        if "dup_of" in rec and (rec["dup_of"] not in seen or rec["dup_of"] == rec["fd"]):
            raise c.fail(f"files[{i}].dup_of", f"names fd {rec['dup_of']}, which the task does not have")

    sig = task["signals"]
    if not isinstance(sig["actions"], list) or len(sig["actions"]) != NSIG:
        raise c.fail("signals.actions", f"must hold {NSIG} actions")
    for i, act in enumerate(sig["actions"]):
        if not isinstance(act, list) or len(act) != 4:
            raise c.fail(f"signals.actions[{i}]", "must be [handler, flags, restorer, mask]")
        for j, x in enumerate(act):
            c.int_in(x, 0, U64, f"signals.actions[{i}][{j}]")
    c.int_in(sig["blocked"], 0, U64, "signals.blocked")
    for i, it in enumerate(sig["itimers"]):
        if not isinstance(it, list) or len(it) != 4:
            raise c.fail(f"signals.itimers[{i}]", "must be [interval s, us, value s, us]")
        for j, x in enumerate(it):
            c.int_in(x, 0, (1 << 62) if j % 2 == 0 else 999_999, f"signals.itimers[{i}][{j}]")

    misc = task["misc"]
    c.int_in(misc["umask"], 0, 0o7777, "misc.umask")
    c.path(misc["cwd"], "misc.cwd")
    for key in ("uids", "gids"):
        ids = misc["creds"][key]
        if not isinstance(ids, list) or len(ids) != 4:
            raise c.fail(f"misc.creds.{key}", "must hold 4 ids (real, effective, saved, fs)")
        for j, x in enumerate(ids):
            c.int_in(x, 0, U32 - 1, f"misc.creds.{key}[{j}]")
    groups = misc["creds"]["groups"]
    if len(groups) > 65536:
        raise c.fail("misc.creds.groups", "holds more than 65536 groups")
    for j, x in enumerate(groups):
        c.int_in(x, 0, U32 - 1, f"misc.creds.groups[{j}]")
    rl = misc["rlimits"]
    if not isinstance(rl, list) or len(rl) != 16:
        raise c.fail("misc.rlimits", "must hold 16 [soft, hard] limits")
    for j, pair in enumerate(rl):
        if not isinstance(pair, list) or len(pair) != 2:
            raise c.fail(f"misc.rlimits[{j}]", "must be [soft, hard]")
        soft = c.int_in(pair[0], 0, U64, f"misc.rlimits[{j}][0]")
        hard = c.int_in(pair[1], 0, U64, f"misc.rlimits[{j}][1]")
        if soft > hard:
            raise c.fail(f"misc.rlimits[{j}]", f"has soft {soft} above hard {hard}")


def check_task_fields(pid: int, task: dict[str, Any]) -> None:
    """Every field a restore reads, with its type: a broken image fails here, before anything exists."""
    name = task_name(pid)
    check_schema(task, TASK_FIELDS_SCHEMA, name)
    for i, v in enumerate(task["mm"]["vmas"]):
        check_schema(v, VMA_SCHEMA, name, f"mm.vmas[{i}].")
    for i, o in enumerate(task["mm"]["objects"]):
        check_schema(o, OBJECT_SCHEMA, name, f"mm.objects[{i}].")
    for i, f in enumerate(task["files"]):
        check_schema(f, FD_SCHEMA, name, f"files[{i}].")
    cgs = task.get("cgroups", [])
    if not isinstance(cgs, list):
        raise ImageError(f"{name}: field 'cgroups' must be an array")
    for i, c in enumerate(cgs):
        check_schema(c, CGROUP_SCHEMA, name, f"cgroups[{i}].")


def validate_image(img: Any) -> None:
    """The whole semantic check of an opened Image, shared by eager restore, lazy restore and the lazy-pages
    server: who could have written it, field types, then ranges and consistency of every task. Raises
    ImageError naming file and field."""
    check_ownership(img.path, [n for n in (*img.files, "inventory.json")])
    for pid in img.tasks:
        task = img.task(pid)
        if img.inventory.get("version") == 1 and "threads" in task:
            raise ImageError(f"{task_name(pid)}: field 'threads' in a version 1 image (threads came with version 2)")
        check_task_fields(pid, task)
        check_sched(task.get("sched"), task_name(pid), "sched")
        for i, rec in enumerate(task.get("threads") or []):
            if isinstance(rec, dict):
                check_sched(rec.get("sched"), task_name(pid), f"threads[{i}].sched")
        size = sum(n for _, n in pages_parts(img.files, pid))
        check_task(task, task_name(pid), size // PAGE_SIZE,
                   lambda name: isinstance(name, str) and blob_name(name) in img.files, pid)
    check_shared(img.json(SHARED_JSON) if SHARED_JSON in img.files else None,
                 {pid: img.task(pid) for pid in img.tasks}, lambda name: blob_name(name) in img.files,
                 {pid: img.tree[pid].ppid for pid in img.tasks})
    check_shared_memory({pid: img.task(pid) for pid in img.tasks}, img.inventory.get("version", 0))
    if "cow.json" in img.files:
        if img.inventory.get("version", 0) < 4:
            raise ImageError("cow.json in a version "
                             f"{img.inventory.get('version')} image (copy-on-write runs came with version 4)")
        tree = img.tree
        check_cow(img.json("cow.json"), {p: n.ppid for p, n in tree.nodes.items()},
                  {p: img.task(p) for p in tree.live()})


def check_cow(cow: object, parents: dict[int, int], tasks: dict[int, dict[str, Any]]) -> None:
    """cow.json (format 4, dump/cow.py): for live tasks of the image, "owned" and "inherited" page ranges
    [start, npages], each list sorted, page aligned, not overlapping, in user space; a task's owned and inherited
    ranges disjoint; what a task inherits held by its parent (owned or inherited there), inside private vmas the
    task has exactly as its parent has them (the restore keeps them from the fork). Linear in the ranges.
    Raises ImageError "cow.json: pid 12: ..."."""
    name = "cow.json"
    if not isinstance(cow, dict):
        raise ImageError(f"{name}: must be an object")
    ranges: dict[int, dict[str, list[tuple[int, int]]]] = {}
    for key, rec in cow.items():
        where = f"{name}: pid {key}"
        if not key.isdigit() or int(key) not in tasks:
            raise ImageError(f"{where}: not a live task of the image")
        if not isinstance(rec, dict) or set(rec) != {"owned", "inherited"}:
            raise ImageError(f"{where}: must be an object with 'owned' and 'inherited' only")
        mine = ranges[int(key)] = {}
        for field, runs in rec.items():
            fast = _ranges_in_order(runs)
            if fast is not None:
                mine[field] = fast
                continue
            if not isinstance(runs, list) or not all(
                    isinstance(r, list) and len(r) == 2 and type(r[0]) is int and type(r[1]) is int for r in runs):
                raise ImageError(f"{where}: '{field}' must be an array of [start, npages]")
            out = mine[field] = []
            prev = 0
            for start, n in runs:
                end = start + n * PAGE_SIZE
                if start % PAGE_SIZE or n <= 0 or start < prev or end > USER_TOP:
                    raise ImageError(f"{where}: '{field}' range {start:#x} (+{n} pages) is unaligned, empty, "
                                     "out of order or outside user space")
                out.append((start, end))
                prev = end
        if _overlap(mine["owned"], mine["inherited"]):
            raise ImageError(f"{where}: a range both owned and inherited")
    for pid, mine in ranges.items():
        if not mine["inherited"]:
            continue
        where = f"{name}: pid {pid}"
        parent = ranges.get(parents.get(pid, -1))
        held = sorted((parent["owned"] + parent["inherited"]) if parent else [])
        bad = _not_within(mine["inherited"], held)
        if bad is not None:
            raise ImageError(f"{where}: inherits {bad:#x}, which its parent does not hold")
        vmas = [v for v in tasks[pid]["mm"]["vmas"] if not v["shared"] and v["kind"] in ("anon", "file")]
        bad = _not_within(mine["inherited"], [(v["start"], v["end"]) for v in vmas])
        if bad is not None:
            raise ImageError(f"{where}: inherits {bad:#x}, outside its private vmas")
        theirs = {(v["start"], v["end"]) for v in tasks[parents[pid]]["mm"]["vmas"]
                  if not v["shared"] and v["kind"] in ("anon", "file")}
        for v in vmas:
            if (v["start"], v["end"]) not in theirs and _overlap([(v["start"], v["end"])], mine["inherited"]):
                raise ImageError(f"{where}: its vma at {v['start']:#x} is not its parent's")


def _ranges_in_order(runs: object) -> list[tuple[int, int]] | None:
    """cow.json's [start, npages] ranges as [start, end) when all are well formed, page aligned, in order without
    overlap and in user space, checked by C-level maps (a child inherits thousands); else None, and check_cow
    walks them one by one to name the first that is not."""
    if type(runs) is not list:
        return None
    if not runs:
        return []
    if set(map(type, runs)) != {list}:
        return None
    try:  # a range of another length: zip or the unpacking raises
        starts, counts = zip(*runs, strict=True)
    except ValueError:
        return None
    if set(map(type, starts)) | set(map(type, counts)) != {int}:
        return None
    if min(counts) < 1 or starts[0] < 0 or any(map(_PAGE_MASK.__and__, starts)):
        return None
    ends = list(map(operator.add, starts, map(PAGE_SIZE.__mul__, counts)))
    if ends[-1] > USER_TOP or not all(map(operator.le, ends, starts[1:])):
        return None
    return list(zip(starts, ends, strict=True))


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    """Two sorted lists of disjoint [start, end) ranges: does any range of one overlap one of the other?"""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] <= b[j][0]:
            i += 1
        elif b[j][1] <= a[i][0]:
            j += 1
        else:
            return True
    return False


def _not_within(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> int | None:
    """The first address of sorted `inner` not covered by sorted `outer` (adjacent outer ranges join), or
    None."""
    if _all_within(inner, outer):
        return None
    j = 0
    for s, e in inner:
        pos = s
        while pos < e:
            while j < len(outer) and outer[j][1] <= pos:
                j += 1
            if j == len(outer) or outer[j][0] > pos:
                return pos
            pos = outer[j][1]
    return None


def _all_within(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    """Whether sorted, disjoint `inner` lies within sorted `outer`, by bisection over the joined outer ranges
    (few) instead of a step per inner range (a child's thousands of inherited runs); False may also mean
    "not sure": _not_within then walks them one by one for the address to name."""
    joined: list[list[int]] = []
    for s, e in outer:
        if joined and s <= joined[-1][1]:
            joined[-1][1] = max(joined[-1][1], e)
        else:
            joined.append([s, e])
    if not inner:
        return True
    starts = [s for s, _ in inner]
    within = 0
    for s, e in joined:
        lo, hi = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
        if hi > lo:
            if inner[hi - 1][1] > e:  # inner disjoint and sorted: the last one starting inside ends last
                return False
            within += hi - lo
    return within == len(inner)


def check_ownership(path: str | Path, names: list[str] | None = None) -> None:
    """Refuse an image that someone other than root (or the restorer itself) could have written: its directory
    and each file must belong to uid 0 or our euid and be writable by nobody else, and every file must be a
    regular file, not a symlink. A restore runs as root and builds a process from whatever the image says, so
    the image must come from someone as trusted as the restorer (README, "Trust model")."""
    me = os.geteuid()
    entries = [(str(path), os.stat(path))]
    for name in sorted(names if names is not None else os.listdir(path)):
        entries.append((f"{path}/{name}", os.lstat(os.path.join(path, name))))
    for where, st in entries:
        if st.st_uid not in (0, me):
            raise ImageError(f"{where}: owned by uid {st.st_uid}; an image must belong to root", path=where)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ImageError(f"{where}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                             "an image must be writable by its owner only", path=where)
        if where != str(path) and not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{where}: not a regular file", path=where)


def check_sched(rec: object, fname: str, field: str) -> None:
    """A "sched" record (dump/sched.py): policy, priority, nice, affinity, timer slack in range."""
    if rec is None:
        return
    c = _Checker(fname)
    if not isinstance(rec, dict):
        raise c.fail(field, "must be an object")
    for key in ("policy", "priority", "nice", "affinity", "slack_ns"):
        if key not in rec:
            raise c.fail(f"{field}.{key}", "is missing")
    if c.int_in(rec["policy"], 0, 0x40000005, f"{field}.policy") & ~0x40000000 not in (0, 1, 2, 3, 5):
        raise c.fail(f"{field}.policy", f"is not a policy a restore sets ({rec['policy']})")
    c.int_in(rec["priority"], 0, 99, f"{field}.priority")
    c.int_in(rec["nice"], -20, 19, f"{field}.nice")
    c.int_in(rec["slack_ns"], 0, U64, f"{field}.slack_ns")
    cpus = rec["affinity"]
    if not isinstance(cpus, list) or not cpus or len(cpus) > 8192:
        raise c.fail(f"{field}.affinity", "must be a non-empty array of CPU numbers")
    for i, cpu in enumerate(cpus):
        c.int_in(cpu, 0, 8191, f"{field}.affinity[{i}]")
