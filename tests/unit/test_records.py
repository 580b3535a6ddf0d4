"""lazarus/records.py: `@record` behaves as the @dataclass it replaced where lazarus relies on it, and the
restore command and its lazy-pages daemon import neither dataclasses (with inspect, ast, dis, tokenize) nor
typing at run time (~17 ms of each command's start-up)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import ClassVar  # noqa: F401 - dataclasses finds a string "ClassVar[...]" through this module

import pytest

from lazarus.kernel import procfs, uffd
from lazarus.records import FrozenInstanceError, field, fields, record, replace

# What `lazarus restore [--lazy] -d` and the daemon it forks import (cli -> api -> restore; the daemon: the
# server, its guard, the handoff, the image's checks).
RESTORE_IMPORTS = ("lazarus.cli", "lazarus.api", "lazarus.restore", "lazarus.lazy.daemon", "lazarus.lazy.handoff",
                   "lazarus.lazy.server", "lazarus.lazy.guard", "lazarus.lazy.trust", "lazarus.lazy.anchor",
                   "lazarus.lazy.pagefiles", "lazarus.images.validate", "lazarus.images.mm", "lazarus.kernel.uffd")
NOT_AT_RUN_TIME = ("dataclasses", "inspect", "typing", "ast", "dis", "tokenize")


def test_the_restore_and_its_daemon_import_neither_dataclasses_nor_typing() -> None:
    # A fresh interpreter without site (as the installed command starts), on this process's paths.
    code = (f"import sys, json; sys.path[:0] = {sys.path!r}\n"
            f"for m in {RESTORE_IMPORTS!r}: __import__(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    assert set(RESTORE_IMPORTS) <= loaded
    assert not loaded & set(NOT_AT_RUN_TIME), sorted(loaded & set(NOT_AT_RUN_TIME))


def _pair(**opts: bool) -> tuple[type, type]:
    """The same class as a record and as a dataclass."""
    def body() -> dict:
        return {"__annotations__": {"a": "int", "b": "str", "c": "list", "d": "dict", "K": "ClassVar[int]"},
                "K": 7, "b": "x", "c": dataclasses.field(default_factory=list, compare=False),
                "d": dataclasses.field(default_factory=dict, repr=False, compare=False), "__doc__": "Doc."}
    rb = body()
    rb["c"] = field(default_factory=list, compare=False)
    rb["d"] = field(default_factory=dict, repr=False, compare=False)
    return record(type("R", (), rb), **opts), dataclasses.dataclass(type("R", (), body()), **opts)


@pytest.mark.parametrize("opts", [{}, {"slots": True}, {"frozen": True}, {"frozen": True, "slots": True}])
def test_a_record_behaves_as_the_dataclass_it_replaced(opts: dict[str, bool]) -> None:
    rec, dc = _pair(**opts)
    for cls in (rec, dc):
        x, y = cls(1), cls(1, "x", [5])
        assert x == y and x != cls(2) and x.c == [] and x.c is not cls(1).c and x.d == {}
        assert (x == 1) is False
        assert cls.K == 7 and cls.__doc__ == "Doc."
    assert repr(rec(1, "y", [2])) == repr(dc(1, "y", [2])) == "R(a=1, b='y', c=[2])"
    assert rec(1) != dc(1)  # other classes are never equal, as with dataclasses
    assert [f.name for f in fields(rec)] == [f.name for f in dataclasses.fields(dc)] == ["a", "b", "c", "d"]
    assert ("__slots__" in vars(rec)) == ("__slots__" in vars(dc)) == opts.get("slots", False)
    if opts.get("slots"):
        assert not hasattr(rec(1), "__dict__") and rec.__slots__ == ("a", "b", "c", "d")
    else:
        assert rec.b == dc.b == "x" and not hasattr(rec, "c") and not hasattr(dc, "c")
    if opts.get("frozen"):
        x = rec(1)
        assert hash(x) == hash(rec(1, "x", [9])) and {x: 1}[rec(1)] == 1
        with pytest.raises(FrozenInstanceError):
            x.a = 2  # type: ignore[misc]
        with pytest.raises(AttributeError):
            del x.a  # type: ignore[misc]
    else:
        assert rec.__hash__ is None and dc.__hash__ is None
        x = rec(1)
        x.a = 3
        assert x == rec(3)
    y = replace(rec(1, "q"), a=4)
    assert (y.a, y.b) == (4, "q")


def test_arguments_are_checked_as_a_dataclass_checks_them() -> None:
    rec, dc = _pair()
    for cls in (rec, dc):
        with pytest.raises(TypeError):
            cls()
        with pytest.raises(TypeError):
            cls(1, a=2)
        with pytest.raises(TypeError):
            cls(1, e=2)
        assert cls(a=1, b="z").b == "z"
    with pytest.raises(TypeError, match="non-default"):
        record(type("Bad", (), {"__annotations__": {"a": "int", "b": "int"}, "a": 1}))


def test_a_class_that_writes_its_own_methods_keeps_them() -> None:
    def own_repr(self: object) -> str:
        return "mine"
    cls = record(type("O", (), {"__annotations__": {"a": "int"}, "__repr__": own_repr}), frozen=True)
    assert repr(cls(1)) == "mine" and cls(1) == cls(1)


def test_lazarus_records_stay_values() -> None:
    # Frozen procfs results are used as dict keys and compared; uffd events are compared in tests.
    line = "7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n"
    a, b = procfs.parse_maps(line)[0], procfs.parse_maps(line)[0]
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1 and a.size == 0x2000
    with pytest.raises(AttributeError):
        a.start = 0  # type: ignore[misc]
    assert repr(a).startswith("Vma(start=139637976727552, end=139637976735744, prot=3, shared=False")
    assert uffd.PageFault(address=0x1000, flags=0, tid=1) == uffd.PageFault(0x1000, 0, 1) != uffd.PageFault(0, 0, 1)


@pytest.mark.parametrize("opts", [{}, {"frozen": True, "slots": True}])
def test_init_is_compiled_after_the_first_instances_even_of_a_subclass(opts: dict[str, bool]) -> None:
    """The first instances go through the generic __init__ (the same checks), then the class compiles its own."""
    from lazarus import records
    cls = record(type("L", (), {"__annotations__": {"a": "int", "b": "int"}, "b": 2}), **opts)
    stub = cls.__init__
    for args, kwargs in (((1, 2, 3), {}), ((), {}), ((1,), {"a": 2}), ((1,), {"e": 2})):
        with pytest.raises(TypeError):
            cls(*args, **kwargs)
    assert cls(3, b=4) == cls(3, 4) and repr(cls(3)) == "L(a=3, b=2)" and cls.__init__ is stub
    sub = type("S", (cls,), {"__slots__": ()} if opts else {})
    for _ in range(records.COMPILE_AFTER):
        s = sub(1)
        assert (s.a, s.b) == (1, 2)
    assert cls.__init__ is not stub and sub.__init__ is cls.__init__
    assert cls(3, b=4) == cls(3, 4) and repr(cls(3)) == "L(a=3, b=2)"
    with pytest.raises(TypeError):
        cls(1, 2, 3)
    if opts:
        with pytest.raises(records.FrozenInstanceError):
            s.a = 5


@pytest.mark.parametrize("opts", [{}, {"slots": True}, {"frozen": True}, {"frozen": True, "slots": True}])
def test_a_record_copies_and_pickles(opts: dict[str, bool]) -> None:
    import copy
    import pickle
    line = "7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n"
    vma = procfs.parse_maps(line)[0]
    assert copy.copy(vma) == vma and pickle.loads(pickle.dumps(vma)) == vma and copy.deepcopy(vma) == vma
    rec, _ = _pair(**opts)
    globals()["R"] = rec  # pickle finds the class by its module and name
    try:
        x = rec(1, "y", [2])
        for y in (copy.copy(x), copy.deepcopy(x), pickle.loads(pickle.dumps(x))):
            assert y == x and (y.c, y.d) == ([2], {})
    finally:
        del globals()["R"]


def test_compile_pending_puts_every_waiting_init_in_place() -> None:
    """The service compiles ahead the __init__ of every record class (records.compile_pending) so that its
    workers' first instances cost no exec; the compiled __init__ behaves as the one the first instance makes."""
    from lazarus.records import compile_pending

    @record
    class Plain:
        a: int
        b: list = field(default_factory=list)

    @record(frozen=True, slots=True)
    class Frozen:
        x: int
        y: int = 2

    stubs = (Plain.__dict__["__init__"], Frozen.__dict__["__init__"])
    compile_pending()
    assert Plain.__dict__["__init__"] is not stubs[0] and Frozen.__dict__["__init__"] is not stubs[1]
    p, q = Plain(1), Plain(1)
    assert p.b == [] and p.b is not q.b and Plain(3, [4]).b == [4]
    f = Frozen(1)
    assert (f.x, f.y) == (1, 2) and Frozen(1, 5).y == 5
    with pytest.raises(FrozenInstanceError):
        f.x = 3  # type: ignore[misc]
    compile_pending()  # nothing left: a no-op
