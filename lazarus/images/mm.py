"""Pure functions over a task's mm record: which memory a lazy restore serves through userfaultfd.

Shared by the restore (which registers the ranges) and the lazy-pages server (which serves them), so that the
two always agree; free of syscalls like the rest of this package.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

PAGE_SIZE = 4096

# The VmFlags codes of /proc/PID/smaps, by how a restore brings them back.
# Given by the mmap itself (protection, sharing, the open mode of the file, MAP_GROWSDOWN/NORESERVE, accounting):
VMFLAGS_FROM_MMAP = frozenset({"rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "gd", "nr", "ac"})
# Re-applied by an injected call: madvise (dd wf rr sr hg nh mg dc), guard regions (gu), mlock2 (lo lf), mseal (sl):
VMFLAGS_APPLIED = frozenset({"dd", "wf", "rr", "sr", "hg", "nh", "mg", "dc", "gu", "lo", "lf", "sl"})
# Bookkeeping that a dump may ignore: soft-dirty tracking.
VMFLAGS_IGNORED = frozenset({"sd"})
# Refused, with what they mean (anything not listed anywhere is refused as unknown).
VMFLAGS_REFUSED = {
    "ht": "a hugetlb mapping", "pf": "a PFN mapping of a device", "io": "a memory-mapped I/O range",
    "de": "a driver mapping that cannot grow", "ar": "an architecture-specific mapping", "ss": "a shadow stack",
    "sf": "a synchronous (MAP_SYNC) DAX mapping", "um": "registered with a userfaultfd",
    "uw": "registered with a userfaultfd", "ui": "registered with a userfaultfd",
}
# The flags a restored mapping must show again (uffd registration of our own comes and goes).
VMFLAGS_COMPARED = VMFLAGS_FROM_MMAP | VMFLAGS_APPLIED


def refused_vmflag(flags: list[str] | frozenset[str]) -> str | None:
    """Why a mapping with these VmFlags cannot be saved faithfully, or None."""
    for f in sorted(flags):
        if f in VMFLAGS_REFUSED:
            return f"VmFlags {f!r} ({VMFLAGS_REFUSED[f]}) is not supported"
        if f not in VMFLAGS_FROM_MMAP and f not in VMFLAGS_APPLIED and f not in VMFLAGS_IGNORED:
            return f"VmFlags {f!r} is not known to lazarus"
    return None


def lazy_object_ids(mm: dict[str, Any], fds: list[dict[str, Any]]) -> set[int]:
    """Shared-memory objects a lazy restore serves through userfaultfd: those the task reaches only through
    its mappings. An object it also holds an fd to must be filled at once: read(2) on a memfd page that is
    not there returns zeros instead of faulting."""
    held = {f["object"] for f in fds if f["type"] == "memfd"}
    # Nor objects that must be complete before the task runs: regular files (recreated deleted files;
    # userfaultfd cannot serve them), sealed memfds (filled before their seals go on), and objects with a
    # locked, sealed or private mapping (mlock faults pages in; a private mapping copies them), and objects
    # with guard regions in a mapping (UFFDIO_COPY of the object's page there would replace the guard).
    for v in mm["vmas"]:
        if "object" in v and (not v["shared"] or v.get("guards") or any(f in v["vmflags"] for f in ("lo", "sl"))):
            held.add(v["object"])
    # Nor objects shared with other tasks (one content for all: filled at once by the task that makes them).
    return {o["id"] for o in mm["objects"] if o["id"] not in held and o["pages"] and "shared" not in o
            and o["kind"] in ("shmem", "memfd") and o.get("seals", SEALS_NONE) == SEALS_NONE}


SEALS_NONE = 1  # F_SEAL_SEAL alone: what a memfd made without MFD_ALLOW_SEALING reports


def lazy_vmas(mm: dict[str, Any], lazy_ids: set[int]) -> list[dict[str, Any]]:
    """The vmas a lazy restore registers with userfaultfd, each with its page runs by address.

    Anonymous private vmas carry their runs already; a shared object's runs (by object offset) are
    translated into every vma that maps them, so a fault in any mapping of the object finds its page.
    """
    objects = {o["id"]: o for o in mm["objects"]}
    out = []
    for v in mm["vmas"]:
        if is_lazy(v):
            out.append(v)
        elif v["kind"] in ("shmem", "memfd") and v.get("object") in lazy_ids:
            lo, hi = v["offset"], v["offset"] + v["end"] - v["start"]
            runs = []
            for offset, n, idx in objects[v["object"]]["pages"]:
                a, b = max(offset, lo), min(offset + n * PAGE_SIZE, hi)
                if a < b:
                    runs.append([v["start"] + a - lo, (b - a) // PAGE_SIZE, idx + (a - offset) // PAGE_SIZE])
            out.append({"start": v["start"], "end": v["end"], "kind": v["kind"], "pages": runs})
    return out


def is_lazy(vma: dict[str, Any]) -> bool:
    """Whether a restore fills this vma through userfaultfd (anonymous private memory).

    Not locked or sealed mappings: mlock must find their pages in place (it faults them all in, and a lazy
    fault would wait on a server that does not hold the uffd yet), and mseal comes last. Not wipe-on-fork
    ones: a fork child's copy of the range is empty by definition, but its uffd registration is inherited and
    the server would fill it with the parent's data."""
    flags = vma.get("vmflags", ())
    return (vma["kind"] == "anon" and not vma["shared"]
            and not any(f in flags for f in ("lo", "sl", "wf")))


def huge_ranges(vmas: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(address, length) of every range a task held in transparent huge pages at dump ("huge" runs of its
    anonymous vmas), for MADV_COLLAPSE once the range is filled."""
    return [(int(a), int(n) * PAGE_SIZE) for v in vmas for a, n in v.get("huge", ())]


def owned_cow(img: Any, pid: int) -> list[tuple[int, int]]:
    """[start, end) of the copy-on-write runs (cow.json, format 4) task `pid` owns: a restore writes them before
    it forks the children that share them, so a lazy server never serves them."""
    if "cow.json" not in img.files:
        return []
    rec = img.json("cow.json").get(str(pid))
    return [(s, s + n * PAGE_SIZE) for s, n in rec["owned"]] if rec else []


def without(vmas: list[dict[str, Any]], ranges: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """The vmas with their page runs ([vaddr, npages, file index]) minus the sorted, disjoint `ranges`."""
    if not ranges:
        return vmas
    out = []
    for v in vmas:
        runs = []
        j = 0  # page runs are sorted: the ranges before this one's start are behind for good
        for vaddr, n, idx in v["pages"]:
            pos, end = vaddr, vaddr + n * PAGE_SIZE
            while j < len(ranges) and ranges[j][1] <= pos:
                j += 1
            k = j
            while k < len(ranges) and ranges[k][0] < end:
                s, e = ranges[k]
                if s > pos:
                    runs.append([pos, (s - pos) // PAGE_SIZE, idx + (pos - vaddr) // PAGE_SIZE])
                pos = max(pos, e)
                if pos >= end:
                    break
                k += 1
            if pos < end:
                runs.append([pos, (end - pos) // PAGE_SIZE, idx + (pos - vaddr) // PAGE_SIZE])
        out.append({**v, "pages": runs})
    return out


def served_vmas(img: Any, pid: int, lazy_ids: set[int]) -> list[dict[str, Any]]:
    """What a lazy server serves task `pid` of `img`: lazy_vmas less the copy-on-write runs it owns."""
    mm = img.task(pid)["mm"]
    return without(lazy_vmas(mm, lazy_ids), owned_cow(img, pid))


def only(vmas: list[dict[str, Any]], ranges: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """The vmas with their page runs cut down to the sorted, disjoint `ranges` (vmas left with none dropped):
    one pass, however many runs (a child that rewrote one page in eight leaves its parent thousands)."""
    if not ranges:  # a task that owns no run (each leaf of a tree): nothing to walk
        return []
    out = []
    for v in vmas:
        runs = []
        j = 0
        for vaddr, n, idx in v["pages"]:
            end = vaddr + n * PAGE_SIZE
            while j < len(ranges) and ranges[j][1] <= vaddr:
                j += 1
            k = j
            while k < len(ranges) and ranges[k][0] < end:
                a, b = max(vaddr, ranges[k][0]), min(end, ranges[k][1])
                runs.append([a, (b - a) // PAGE_SIZE, idx + (a - vaddr) // PAGE_SIZE])
                k += 1
        if runs:
            out.append({**v, "pages": runs})
    return out
