"""shared.json of a tree image: open file descriptions, pipes and FIFOs that several tasks hold, stored once
(docs/IMAGES.md, "Shared objects (format 3)"). Pure Python: the checks a restore runs before creating anything.

    files[]  {id, kind: file|fifo|pipe, holders: [[pid, fd], ...], type, flags, pos, ...the fd record's fields
              that belong to the description (path, ino, dev, locks, owner, sig, pipe)}
    pipes[]  {id, ino, fifo, readers: [file ids], writers: [file ids], pipe_size, data: blob or null}
    states[] {id, kind: fs|files, pids: [pid, ...]}: processes sharing cwd/root/umask (CLONE_FS) or one fd
              table (CLONE_FILES), a process and descendants; a table's fds are in its top's task file only
    task-PID.json files[]: {fd, type: "shared", shared: id, flags, cloexec, pos} for every holder

Memory objects several tasks map (format 5) stay in each holder's task-PID.json mm.objects[], marked
{..., shared: "mem-N"}; one holder stores the content (its runs), the others have no runs and
{content: PID of that holder} (check_shared_memory).
"""

from __future__ import annotations

from collections.abc import Callable

from lazarus.errors import ImageError
from lazarus.images.format import SHMEM_VERSION, task_name

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

SHARED_JSON = "shared.json"
KINDS = ("file", "fifo", "pipe")
_ACCMODE, _RDONLY, _WRONLY = 3, 0, 1
_PIPE_MAX = 1 << 20
_DESC_TYPES = {"file": ("file", "dev", "object_file"), "fifo": ("fifo",), "pipe": ("pipe",)}


def _fail(field: str, why: str) -> ImageError:
    return ImageError(f"{SHARED_JSON}: {field}: {why}")


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def fs_parents(shared: Any, parents: dict[int, int], kind: str = "fs") -> set[int]:
    """Pids made with CLONE_FS (kind "fs") or CLONE_FILES (kind "files") from their parent (members of such a
    group whose parent is in it too), of a checked shared.json (None: none)."""
    out: set[int] = set()
    for st in (shared or {}).get("states", []):
        if st["kind"] == kind:
            out |= {p for p in st["pids"] if parents.get(p) in st["pids"]}
    return out


def fd_table_tops(shared: Any, parents: dict[int, int]) -> dict[int, int]:
    """pid -> the top of the fd table group (CLONE_FILES) it belongs to, for every member, top included;
    the top's task file holds the table (docs/IMAGES.md)."""
    out: dict[int, int] = {}
    for st in (shared or {}).get("states", []):
        if st["kind"] == "files":
            top = next(p for p in st["pids"] if parents.get(p) not in st["pids"])
            out.update({p: top for p in st["pids"]})
    return out


_STATE_FLAG = {"fs": "CLONE_FS", "files": "CLONE_FILES"}


def _check_states(states: Any, parents: dict[int, int], tasks: dict[int, dict[str, Any]] | None = None) -> None:
    if not isinstance(states, list):
        raise _fail("states", "must be an array")
    seen: dict[str, set[int]] = {k: set() for k in _STATE_FLAG}
    for i, st in enumerate(states):
        f = f"states[{i}]"
        if not isinstance(st, dict) or st.get("kind") not in _STATE_FLAG:
            raise _fail(f, "only 'fs' (CLONE_FS) and 'files' (CLONE_FILES) groups are supported")
        flag = _STATE_FLAG[st["kind"]]
        pids = st.get("pids")
        if not isinstance(pids, list) or len(pids) < 2 or not all(_int(p) and p in parents for p in pids):
            raise _fail(f + ".pids", "must list two or more live processes of the image")
        if seen[st["kind"]] & set(pids) or len(set(pids)) != len(pids):
            raise _fail(f + ".pids", "names a process twice, or one of another group")
        seen[st["kind"]] |= set(pids)
        tops = [p for p in pids if parents[p] not in pids]
        if len(tops) != 1:
            raise _fail(f + ".pids", f"must be one process and descendants of it made with {flag}")
        for p in pids if st["kind"] == "files" and tasks is not None else []:
            if p != tops[0] and tasks.get(p, {}).get("files"):
                raise _fail(f + ".pids", f"pid {p} shares the fd table of pid {tops[0]}, and its task file "
                            "lists fds of its own")


def check_shared(shared: Any, tasks: dict[int, dict[str, Any]], has_blob: Callable[[str], bool],
                 parents: dict[int, int] | None = None) -> None:
    """Refuse, in one line naming the field, a shared.json that does not fit the tasks: ids unknown or
    repeated, a holder whose task has no stub for it (or a stub naming another id), holders disagreeing with
    the description (flags, offset), pipe ends that are not pipe descriptions of the right access. Stubs in
    the tasks naming an id shared.json lacks are refused too (with `shared` None when there is no file)."""
    stubs = {(pid, r["fd"]): r for pid, t in tasks.items() for r in t["files"] if r.get("type") == "shared"}
    if shared is None:
        if stubs:
            (pid, fd), rec = next(iter(stubs.items()))
            raise ImageError(f"{task_name(pid)}: fd {fd} names shared object {rec.get('shared')!r}, and the "
                             f"image has no {SHARED_JSON}")
        return
    if len(tasks) < 2:
        raise ImageError(f"{SHARED_JSON}: in an image of one process, which shares nothing")
    if not isinstance(shared, dict) or not isinstance(shared.get("files"), list) \
            or not isinstance(shared.get("pipes"), list):
        raise ImageError(f"{SHARED_JSON}: must be an object with arrays 'files' and 'pipes'")
    if "states" in shared:
        _check_states(shared["states"], parents if parents is not None else {p: 0 for p in tasks}, tasks)
    known = {d.get("id") for d in shared["files"] if isinstance(d, dict)}
    for (pid, fd), stub in stubs.items():
        if stub.get("shared") not in known:
            raise ImageError(f"{task_name(pid)}: fd {fd} names shared object {stub.get('shared')!r}, which "
                             f"{SHARED_JSON} does not have")
    descs: dict[str, dict[str, Any]] = {}
    held: set[tuple[int, int]] = set()
    for i, d in enumerate(shared["files"]):
        f = f"files[{i}]"
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or d["id"] in descs:
            raise _fail(f, "needs an 'id' of its own")
        if d.get("kind") not in KINDS or d.get("type") not in _DESC_TYPES[d["kind"]]:
            raise _fail(f, f"kind {d.get('kind')!r} / type {d.get('type')!r} is not a shareable description")
        if not _int(d.get("flags")) or not _int(d.get("pos")) or d["flags"] < 0 or d["pos"] < 0:
            raise _fail(f, "needs integer 'flags' and 'pos'")
        if d["type"] in ("file", "dev", "fifo", "object_file") and not (isinstance(d.get("path"), str) and d["path"].startswith("/")):
            raise _fail(f + ".path", "must be an absolute path")
        if d["kind"] == "pipe" and ({"owner", "locks"} & d.keys()):
            raise _fail(f, "a shared pipe end with a signal owner or locks is not supported")
        if d.get("deleted") or "data" in d or "dup_of" in d or "same_inode" in d:
            raise _fail(f, "holds a per-fd or unsupported field (deleted, data, dup_of, same_inode)")
        hs = d.get("holders")
        if not isinstance(hs, list) or not hs:
            raise _fail(f + ".holders", "must be a non-empty array of [pid, fd]")
        for h in hs:
            if not (isinstance(h, list) and len(h) == 2 and _int(h[0]) and _int(h[1])):
                raise _fail(f + ".holders", f"{h!r} is not [pid, fd]")
            key = (h[0], h[1])
            stub = stubs.get(key)
            if stub is None:
                raise _fail(f + ".holders", f"pid {h[0]} fd {h[1]} is not a shared fd of a task of the image")
            if key in held or stub.get("shared") != d["id"]:
                raise _fail(f + ".holders", f"pid {h[0]} fd {h[1]} is claimed by {stub.get('shared')!r} and "
                            f"{d['id']!r}")
            if (stub["flags"], stub["pos"]) != (d["flags"], d["pos"]):
                raise _fail(f + ".holders", f"pid {h[0]} fd {h[1]} has flags {stub['flags']:#o} offset "
                            f"{stub['pos']}, the description {d['flags']:#o} offset {d['pos']}")
            held.add(key)
        descs[d["id"]] = d
    for (pid, fd), stub in stubs.items():
        if (pid, fd) not in held:
            raise ImageError(f"{task_name(pid)}: fd {fd} names shared object {stub.get('shared')!r}, whose "
                             "holders leave it out")
    in_pipe: dict[str, str] = {}
    ids = set(descs)
    for i, p in enumerate(shared["pipes"]):
        f = f"pipes[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("id"), str) or p["id"] in ids:
            raise _fail(f, "needs an 'id' of its own")
        ids.add(p["id"])
        if not isinstance(p.get("fifo"), bool):
            raise _fail(f + ".fifo", "must be true or false")
        size = p.get("pipe_size")
        if not _int(size) or not 4096 <= size <= _PIPE_MAX:
            raise _fail(f + ".pipe_size", f"must be 4096..{_PIPE_MAX}")
        data = p.get("data")
        if data is not None and (not isinstance(data, str) or not has_blob(data)):
            raise _fail(f + ".data", f"names blob {data!r}, which the image does not hold")
        ends = 0
        for side, bad in (("readers", _WRONLY), ("writers", _RDONLY)):
            lst = p.get(side)
            if not isinstance(lst, list):
                raise _fail(f"{f}.{side}", "must be an array of file ids")
            for did in lst:
                d = descs.get(did) if isinstance(did, str) else None
                if d is None:
                    raise _fail(f"{f}.{side}", f"names {did!r}, which is not in 'files'")
                if d["kind"] != ("fifo" if p["fifo"] else "pipe") or d["flags"] & _ACCMODE == bad:
                    raise _fail(f"{f}.{side}", f"{did!r} is not a {side[:-1]} of this pipe")
                if in_pipe.setdefault(did, p["id"]) != p["id"]:
                    raise _fail(f"{f}.{side}", f"{did!r} is an end of {in_pipe[did]!r} too")
                ends += 1
        if not ends:
            raise _fail(f, "has no ends")
    for did, d in descs.items():
        if d["kind"] == "pipe" and did not in in_pipe:
            raise ImageError(f"{SHARED_JSON}: {did!r} is a pipe end of no pipe in 'pipes'")


__all__ = ["KINDS", "SHARED_JSON", "check_shared", "fd_table_tops", "fs_parents"]


def check_shared_memory(tasks: dict[int, dict[str, Any]], version: int) -> None:
    """Memory objects stored once (mm.objects[] with "shared"): each id has exactly one record holding the
    content, in a task of the image, and every other record of that id names it ("content") and agrees on
    kind, size and name; all of this only in a version 5 image (older readers would restore them empty)."""
    stores: dict[str, tuple[int, dict[str, Any]]] = {}
    refs: list[tuple[str, str, dict[str, Any]]] = []
    for pid, task in tasks.items():
        for i, o in enumerate(task["mm"]["objects"]):
            if "shared" not in o and "content" not in o:
                continue
            f = f"{task_name(pid)}: mm.objects[{i}]"
            sid = o.get("shared")
            if not isinstance(sid, str) or not sid.startswith("mem-"):
                raise ImageError(f"{f}.shared: must be a memory object id (mem-N)")
            if version < SHMEM_VERSION:
                raise ImageError(f"{f}.shared: in a version {version} image (shared memory objects came with "
                                 f"version {SHMEM_VERSION})")
            if o["kind"] not in ("shmem", "memfd", "deleted", "sysv"):
                raise ImageError(f"{f}.kind: {o['kind']!r} cannot be shared between tasks")
            if "content" in o:
                if not _int(o["content"]) or o["content"] == pid or o["pages"]:
                    raise ImageError(f"{f}.content: must name another task's pid, with no runs of its own")
                refs.append((f, sid, o))
            elif sid in stores:
                raise ImageError(f"{f}.shared: {sid} stored by pid {stores[sid][0]} already")
            else:
                stores[sid] = (pid, o)
    for f, sid, o in refs:
        pid, store = stores.get(sid, (0, {}))
        if pid != o["content"]:
            raise ImageError(f"{f}.content: pid {o['content']} does not store {sid}")
        if any(store[k] != o[k] for k in ("kind", "size", "name")):
            raise ImageError(f"{f}: {sid} has another kind, size or name in pid {pid}")
