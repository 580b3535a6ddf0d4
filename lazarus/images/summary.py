"""What `lazarus show` prints, as plain data: one dict per image directory (JSON-ready).

Pure Python over an opened Image; the register and thread checks it needs are imported when called, so that
loading this module stays free of the kernel layer (tests/unit/test_layering.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lazarus.images.format import PAGE_SIZE


def fd_target(f: dict[str, Any]) -> str:
    """What `show` prints as an fd's target."""
    if f.get("path"):
        return str(f["path"])
    if "dup_of" in f:
        return f"dup of fd {f['dup_of']}"
    kind = f["type"]
    if kind == "pipe":
        return f"pipe:[{f.get('pipe')}]"
    if kind == "unix":
        return f"unix socket, peer socket:[{f.get('peer')}]"
    if kind == "epoll":
        return "epoll: fds " + ",".join(str(x["tfd"]) for x in f.get("targets", [])) if f.get("targets") else "epoll"
    if kind == "inotify":
        return "inotify: " + ", ".join(f"{w['wd']}={w['path']}" for w in f.get("watches", []))
    return kind


def _shared_target(f: dict[str, Any], shared: dict[str, dict[str, Any]]) -> str:
    """A stub's target: the shared description's id and target (shared.json), as "file-3 (/tmp/log)"."""
    if f["type"] != "shared":
        return fd_target(f)
    d = shared.get(str(f.get("shared")))
    return f"{f.get('shared')} ({fd_target(d)})" if isinstance(d, dict) and "type" in d else str(f.get("shared"))


def _pages_within(ranges: list[list[int]], start: int, end: int) -> int:
    """Pages of the [start, npages] ranges that lie in [start, end)."""
    n = 0
    for s, count in ranges:
        lo, hi = max(s, start), min(s + count * PAGE_SIZE, end)
        if hi > lo:
            n += (hi - lo) // PAGE_SIZE
    return n


def summary(img: Any) -> dict[str, Any]:
    """The summary of opened image `img`: format, tasks (registers, threads, VMAs, fds, signals), files.

    Raises:
        ImageError for a task record `show` cannot read.
    """
    inv = img.inventory
    out: dict[str, Any] = {"directory": str(img.path), "format": inv.get("format"), "version": inv.get("version"),
                           "kernel_release": inv.get("kernel_release"), "cpu": inv.get("cpu"),
                           "created": inv.get("created"), "tasks": [],
                           "tree": [n.record() for n in (img.tree[p] for p in img.tree.order)]}
    from lazarus.images.mm import is_lazy, lazy_object_ids
    from lazarus.kernel import abi
    from lazarus.restore.threads import check_threads
    # Shared id -> pages of a memory object several processes hold, as stored once by one of them (the others'
    # records name that pid as "content" and hold no runs: docs/IMAGES.md).
    stored = {o["shared"]: sum(n for _, n, _ in o["pages"]) for p in img.tasks for o in img.task(p)["mm"]["objects"]
              if "shared" in o and "content" not in o}

    shared = {d["id"]: d for d in img.json("shared.json")["files"]} if "shared.json" in img.files else {}
    from lazarus.images.shared import fd_table_tops
    tops = fd_table_tops(img.json("shared.json") if "shared.json" in img.files else None,
                         {p: n.ppid for p, n in img.tree.nodes.items()})
    from lazarus.images.format import COW_FILE
    # Copy-on-write pages a child keeps from its parent at restore (dump/cow.py): in no page file of the child's.
    cow = img.json(COW_FILE) if COW_FILE in img.files else {}
    for pid in img.tasks:
        t = img.task(pid)
        inherited = (cow.get(str(pid)) or {}).get("inherited") or []
        parent = img.tree.nodes[pid].ppid if pid in img.tree.nodes else 0
        check_threads(t, f"task-{pid}.json")
        lazy_ids = lazy_object_ids(t["mm"], t["files"])
        objects = {o["id"]: o for o in t["mm"]["objects"]}
        regs = abi.user_regs_struct.from_buffer_copy(bytes.fromhex(t["core"]["regs"]))
        vmas = []
        for v in t["mm"]["vmas"]:
            prot = "".join(c if v["prot"] & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4)))
            obj = objects.get(v.get("object", -1))
            npages = sum(n for _, n, _ in (obj["pages"] if obj else v["pages"]))
            vma = {"start": f"{v['start']:#x}", "end": f"{v['end']:#x}",
                   "prot": prot + ("s" if v["shared"] else "p"), "kind": v["kind"], "path": v["path"],
                   "pages": npages, "lazy": is_lazy(v) or (obj is not None and obj["id"] in lazy_ids),
                   "vmflags": " ".join(v["vmflags"])}
            if obj is not None and "content" in obj:
                # Its pages are in the storing process's file: count them there, say whose.
                vma.update(pages=stored.get(obj.get("shared"), 0), stored_by=obj["content"])
            kept = _pages_within(inherited, v["start"], v["end"])
            if kept:
                vma.update(inherited=kept, inherited_from=parent)
            vmas.append(vma)
        fds = [{"fd": f["fd"], "type": f["type"], "target": _shared_target(f, shared),
                "flags": f"{f['flags']:o}", "pos": f["pos"], "cloexec": f["cloexec"]} for f in t["files"]]
        out["tasks"].append({
            "pid": pid, "comm": t["comm"], "exe": t["mm"]["exe"],
            "registers": {"rip": f"{regs.rip:#x}", "rsp": f"{regs.rsp:#x}", "rax": f"{regs.rax:#x}",
                          "orig_rax": f"{regs.orig_rax:#x}", "fs_base": f"{regs.fs_base:#x}",
                          "xstate_bytes": len(t["core"]["xstate"]) // 2},
            "threads": [{"tid": th["tid"], "comm": th["comm"],
                         "rip": f"{abi.user_regs_struct.from_buffer_copy(bytes.fromhex(th['core']['regs'])).rip:#x}"}
                        for th in t.get("threads", [])],
            "vmas": vmas, "fds": fds, **({"fd_table_of": tops[pid]} if tops.get(pid, pid) != pid else {}),
            "pages": sum(v["pages"] for v in vmas), "lazy_pages": sum(v["pages"] for v in vmas if v["lazy"]),
            "signals": {"blocked": f"{t['signals']['blocked']:#x}",
                        "pending": len(t["signals"]["pending_thread"]) + len(t["signals"]["pending_shared"]),
                        "handlers": sum(1 for a in t["signals"]["actions"] if a[0] > 1)},
        })
        if inherited:
            out["tasks"][-1].update(inherited_pages=sum(v.get("inherited", 0) for v in vmas), inherited_from=parent)
        if any("stored_by" in v for v in vmas):
            # "pages" counts what its own page file holds; the objects another process stores apart.
            mine = [v for v in vmas if "stored_by" not in v]
            out["tasks"][-1].update(pages=sum(v["pages"] for v in mine),
                                    lazy_pages=sum(v["pages"] for v in mine if v["lazy"]),
                                    shared_pages=sum(v["pages"] for v in vmas if "stored_by" in v))
    files = {n: m["size"] for n, m in inv["files"].items()}
    files["inventory.json"] = (Path(img.path) / "inventory.json").stat().st_size
    out["files"] = files
    out["total_bytes"] = sum(files.values())
    if len(img.tree.nodes) > 1:
        from lazarus.images.tree import draw
        out["tree_drawing"] = draw(img.tree, {t["pid"]: 1 + len(t["threads"]) for t in out["tasks"]})
    return out


__all__ = ["fd_target", "summary"]
