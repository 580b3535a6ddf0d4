"""Constants, file names, checksums and schemas of the "lazarus-image" format (docs/IMAGES.md)."""

from __future__ import annotations

import json
import re
import sys
from array import array

import xxhash

from lazarus.errors import ImageError

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

FORMAT_NAME = "lazarus-image"
# 2: a task may list its other threads ("threads"); a reader of version 1 would restore the main thread alone, so
# it must refuse these images. Version 1 images (single-threaded) are still read.
# 3: an image may hold a process tree (inventory "tree": parents, sessions, groups, zombies, stopped tasks,
# lazarus/images/tree.py); a reader of version 2 would restore the root alone, so it must refuse these images.
FORMAT_VERSION = 3
# 4: a tree image whose copy-on-write runs are stored once, in their owner (COW_FILE, lazarus/dump/cow.py): the
# other holders' page files leave them out, so a reader of version 3 would restore those pages as zeros; it must
# refuse these images. A dump writes 4 only when it writes COW_FILE, 3 otherwise.
COW_VERSION = 4
COW_FILE = "cow.json"
# 5: a tree image whose memory objects shared between processes (shared anonymous memory, memfds, deleted files)
# are stored once: the other holders' records carry "content" (the storing pid) and no runs, so a reader of
# version 4 would restore them empty; it must refuse these images. Written only by a dump with such objects.
SHMEM_VERSION = 5
# 6: a task's page data may be split in two files, pages-PID.img then pages-PID.1.img, which together are the one
# run of pages the task json indexes (written at once by two writers: buffered writes to one file serialise on
# its inode lock, dump/memory.py). A reader of version 5 refuses such images anyway (the second file has no
# checksum of its own); the version says why. Written only by a dump that splits.
PARTS_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)

PAGE_SIZE = 4096
# The unit of page-data checksumming: small enough that the lazy server verifies little more than it serves,
# large enough that the sums file stays tiny (8 bytes per 64 KiB) and hashing runs at memory speed.
CHUNK_SIZE = 65536
PAGES_PER_CHUNK = CHUNK_SIZE // PAGE_SIZE

INVENTORY = "inventory.json"
# Character devices an fd record of type "dev" may name (major, minor) -> path: they hold no state to save.
STATELESS_DEVICES = {(1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full",
                     (1, 8): "/dev/random", (1, 9): "/dev/urandom"}

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")
# Files we could have written ourselves; anything else in an image directory is left alone.
_OWN_FILE_RE = re.compile(r"(inventory\.json|task-.*|pages-.*|blob-.*|.*\.json)")


def task_name(pid: int) -> str:
    return f"task-{pid}.json"


def pages_name(pid: int) -> str:
    return f"pages-{pid}.img"


def pages_part_name(pid: int) -> str:
    """The second part of a split page file (PARTS_VERSION): its pages follow those of pages-PID.img."""
    return f"pages-{pid}.1.img"


def pages_parts(files: dict[str, Any], pid: int) -> list[tuple[str, int]]:
    """(name, size) of each part of PID's page data listed in an inventory's files, in order ([] if none)."""
    first = files.get(pages_name(pid))
    if first is None:
        return []
    parts = [(pages_name(pid), first["size"])]
    second = files.get(pages_part_name(pid))
    if second is not None:
        parts.append((pages_part_name(pid), second["size"]))
    return parts


def sums_name(pid: int) -> str:
    return f"pages-{pid}.sums"


def blob_name(name: str) -> str:
    return f"blob-{name}.img"


def is_own_file(name: str) -> bool:
    return _OWN_FILE_RE.fullmatch(name) is not None


def check_name(name: str, what: str) -> str:
    """Refuse names that could escape the image directory or hide as dot files."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ImageError(f"invalid {what} name {name!r}")
    return name


def check_pid(pid: object) -> int:
    if type(pid) is not int or pid <= 0:
        raise ImageError(f"invalid pid {pid!r}")
    return pid


def xxh3(data: object) -> int:
    return xxhash.xxh3_64_intdigest(data)  # type: ignore[arg-type]


def hex64(value: int) -> str:
    # Hex strings rather than JSON numbers: tools that read JSON numbers as doubles would round a u64.
    return f"{value:016x}"


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def inventory_self_check(inv: dict[str, Any]) -> str:
    return hex64(xxh3(canonical_json({k: v for k, v in inv.items() if k != "self_check"})))


def inventory_bytes(inv: dict[str, Any]) -> bytes:
    """The exact on-disk form of inventory.json; the reader insists on it byte for byte, so that even a change
    that leaves the JSON value intact (whitespace, key order) is caught."""
    return json.dumps(inv, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"


def json_bytes(obj: Any) -> bytes:
    # Compact: task files carry long page lists; `lazarus show` pretty-prints for people.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode() + b"\n"


def sums_to_bytes(sums: array) -> bytes:
    if sys.byteorder == "little":
        return sums.tobytes()
    swapped = array("Q", sums)
    swapped.byteswap()
    return swapped.tobytes()


def sums_from_bytes(data: bytes) -> array:
    sums = array("Q")
    sums.frombytes(data)
    if sys.byteorder != "little":
        sums.byteswap()
    return sums


def nchunks(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


# -- schemas -------------------------------------------------------------------------------------------------
#
# A schema maps a key to the JSON type its value must have: a Python type (or tuple of types), or a nested
# schema dict for an object whose own keys are checked the same way. Keys not in a schema are allowed, so an
# image can carry more than a reader checks. `int` never accepts a JSON true/false.

Schema = dict[str, "type | tuple[type, ...] | Schema"]

INVENTORY_SCHEMA: Schema = {
    "format": str,
    "version": int,
    "kernel_release": str,
    "arch": str,
    "cpu": {"xcr0": int, "xstate_size": int},
    "root_pid": int,
    "tasks": list,
    "page_chunk": int,
    "files": dict,
    "self_check": str,
}

# Inventory fields the caller of ImageWriter.commit() supplies; the writer adds the rest.
CALLER_INVENTORY_FIELDS = ("kernel_release", "arch", "cpu", "root_pid", "tasks")

TASK_SCHEMA: Schema = {
    "pid": int,
    "core": dict,
    "mm": dict,
    "files": list,
    "signals": dict,
    "misc": dict,
}

# What a restore needs beyond the top level (checked before anything is created; see restore.open_image).
TASK_FIELDS_SCHEMA: Schema = {
    "pid": int,
    "comm": str,
    "core": {"regs": str, "xstate": str},
    "mm": {
        "start_code": int, "end_code": int, "start_data": int, "end_data": int, "start_brk": int, "brk": int,
        "start_stack": int, "arg_start": int, "arg_end": int, "env_start": int, "env_end": int,
        "auxv": str, "exe": str, "vmas": list, "objects": list,
    },
    "files": list,
    "signals": {
        "actions": list, "blocked": int, "pending_thread": list, "pending_shared": list,
        "altstack": {"sp": int, "flags": int, "size": int}, "itimers": list,
    },
    "misc": {
        "clear_child_tid": int, "robust_list": {"head": int, "len": int}, "personality": int, "umask": int,
        "cwd": str, "comm": str, "rlimits": list, "creds": {"uids": list, "gids": list, "groups": list},
    },
}
VMA_SCHEMA: Schema = {"start": int, "end": int, "prot": int, "shared": bool, "offset": int, "path": str,
                      "kind": str, "vmflags": list, "pages": list}
OBJECT_SCHEMA: Schema = {"id": int, "kind": str, "name": str, "size": int, "pages": list}
CGROUP_SCHEMA: Schema = {"hierarchy": int, "controllers": str, "path": str}
FD_SCHEMA: Schema = {"fd": int, "type": str, "flags": int, "cloexec": bool, "pos": int}

_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer",
                    float: "a number", bool: "a boolean", type(None): "null"}


def json_type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _is(value: object, want: type | tuple[type, ...]) -> bool:
    wants = want if isinstance(want, tuple) else (want,)
    if isinstance(value, bool):
        return bool in wants
    if float in wants and isinstance(value, int):
        return True
    return isinstance(value, wants)


def check_schema(obj: object, schema: Schema, fname: str, prefix: str = "") -> None:
    """Raise ImageError "FILE: field 'a.b' ..." for the first key of `obj` that is missing or mistyped."""
    if not isinstance(obj, dict):
        where = f"field '{prefix[:-1]}'" if prefix else "top level"
        raise ImageError(f"{fname}: {where} must be an object, not {json_type_name(obj)}")
    for key, want in schema.items():
        field = prefix + key
        if key not in obj:
            raise ImageError(f"{fname}: missing field '{field}'")
        value = obj[key]
        if isinstance(want, dict):
            check_schema(value, want, fname, field + ".")
        elif not _is(value, want):
            wants = want if isinstance(want, tuple) else (want,)
            expected = " or ".join(_JSON_TYPE_NAMES.get(w, w.__name__) for w in wants)
            raise ImageError(f"{fname}: field '{field}' must be {expected}, not {json_type_name(value)}")
