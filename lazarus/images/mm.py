"""Pure functions over a task's mm record: which memory a lazy restore serves through userfaultfd.

Shared by the restore (which registers the ranges) and the lazy-pages server (which serves them), so that the
two always agree; free of syscalls like the rest of this package.
"""

from __future__ import annotations

from typing import Any

PAGE_SIZE = 4096


def lazy_object_ids(mm: dict[str, Any], fds: list[dict[str, Any]]) -> set[int]:
    """Shared-memory objects a lazy restore serves through userfaultfd: those the task reaches only through
    its mappings. An object it also holds an fd to must be filled at once: read(2) on a memfd page that is
    not there returns zeros instead of faulting."""
    held = {f["object"] for f in fds if f["type"] == "memfd"}
    return {o["id"] for o in mm["objects"] if o["id"] not in held and o["pages"]}


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
    """Whether a lazy restore serves this vma through userfaultfd (anonymous private memory)."""
    return vma["kind"] == "anon" and not vma["shared"]


def huge_ranges(vmas: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(address, length) of every range a task held in transparent huge pages at dump ("huge" runs of its
    anonymous vmas), for MADV_COLLAPSE once the range is filled."""
    return [(int(a), int(n) * PAGE_SIZE) for v in vmas for a, n in v.get("huge", ())]
