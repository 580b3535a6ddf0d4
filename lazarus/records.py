"""Record classes for the modules a restore and its lazy-pages daemon import: `@record` in place of `@dataclass`.

Importing dataclasses imports inspect (with ast, dis, tokenize, ...): ~15 ms of each `lazarus` command, a fifth
of a lazy restore's whole command; each @dataclass then costs 0.3-1 ms more (it compiles __init__, __repr__,
__eq__ and, for frozen classes, __setattr__ with exec; slots=True builds the class twice; a class without a
docstring gets one from inspect.signature). `record` does what lazarus uses of it for ~0.02 ms a class: __init__
is compiled as a dataclass's (one small exec, so that making an instance costs what it did: the uffd events are
made once per fault), but only when the class makes its first instance (most of the classes a restore imports
never make one there); __repr__, __eq__ and __hash__ are shared functions that read the class's fields.

What it keeps from dataclasses, as lazarus relies on it: fields from the class's annotations in order (ClassVar
ones skipped; with `from __future__ import annotations` they are strings and are not evaluated), defaults and
`field(default=, default_factory=, repr=, compare=)`, equality between instances of the same class over the
compared fields, `frozen=True` (assignment raises FrozenInstanceError, an AttributeError; instances hash by their
compared fields, so they stay usable as dict keys), `slots=True` (the class is made again with __slots__), a
non-frozen record is unhashable (`__hash__ = None`, as a dataclass with eq). Not kept: ordering, __match_args__,
keyword-only fields, __post_init__, inheritance between records, dataclasses.fields()/asdict() (use `fields()`
and `replace()` here).
"""

from __future__ import annotations

_MISSING = object()


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record."""


class Field:
    __slots__ = ("name", "default", "default_factory", "repr", "compare")

    def __init__(self, default: object = _MISSING, default_factory: object = _MISSING, repr: bool = True,
                 compare: bool = True) -> None:
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.repr = repr
        self.compare = compare


def field(*, default: object = _MISSING, default_factory: object = _MISSING, repr: bool = True,
          compare: bool = True) -> object:
    """As dataclasses.field, for what lazarus uses of it."""
    return Field(default, default_factory, repr, compare)


def _repr(self: object) -> str:
    cls = type(self)
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in cls.__record_repr__)
    return f"{cls.__qualname__}({inner})"


def _eq(self: object, other: object) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    names = self.__class__.__record_compare__
    return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)


def _hash(self: object) -> int:
    return hash(tuple(getattr(self, n) for n in self.__class__.__record_compare__))


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _frozen_setstate(self: object, state: object) -> None:
    # copy and pickle set a slots instance's fields by setattr, which a frozen record refuses (as dataclasses).
    for part in state if isinstance(state, tuple) else (state,):
        for name, value in (part or {}).items():
            object.__setattr__(self, name, value)


def fields(obj: object) -> tuple[Field, ...]:
    """The fields of a record class or instance, in order."""
    return obj.__record_fields__  # type: ignore[attr-defined,no-any-return]


def replace(obj: object, **changes: object) -> object:
    """A copy of record `obj` with `changes` (as dataclasses.replace)."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    values.update(changes)
    return type(obj)(**values)


def record(cls: type | None = None, /, *, frozen: bool = False, slots: bool = False):  # type: ignore[no-untyped-def]
    """Class decorator: `@record`, `@record(frozen=True, slots=True)` (see the module's docstring)."""
    def wrap(cls: type) -> type:
        return _make(cls, frozen, slots)
    return wrap if cls is None else wrap(cls)


def _make(cls: type, frozen: bool, slots: bool) -> type:
    ns = dict(cls.__dict__)
    flds: list[Field] = []
    for name, ann in ns.get("__annotations__", {}).items():
        if "ClassVar" in (ann if isinstance(ann, str) else repr(ann)):
            continue
        value = ns.get(name, _MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name = name
        flds.append(f)
        if value is not _MISSING and (slots or isinstance(value, Field)):
            del ns[name]  # a slot cannot share its name with a class attribute; a Field is no default
    seen_default = False
    for f in flds:
        if f.default is not _MISSING or f.default_factory is not _MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
    made: list[type] = []
    qualname = f"{cls.__qualname__}.__init__"

    generic = _generic_init(flds, frozen)
    count = [0]

    def __init__(self: object, *args: object, **kwargs: object) -> None:
        # The first instances are made by a generic __init__ (~2 us each, no compile); the COMPILE_AFTER-th
        # compiles the class's own and puts it in place. Compiling costs ~0.1-0.2 ms, which a class made a few
        # times never earns back: a restore command makes ~13 classes' first instance on its way (~2 ms), its
        # lazy-pages daemon 5 while it answers the handoff; a class made per fault (uffd events) compiles soon.
        count[0] += 1
        if count[0] < COMPILE_AFTER:
            generic(self, *args, **kwargs)
            return
        init = _compile_init(flds, frozen, qualname)
        made[0].__init__ = init  # type: ignore[misc]
        init(self, *args, **kwargs)

    __init__.__qualname__ = qualname
    _uncompiled.append((flds, frozen, qualname, made, __init__))
    ns["__init__"] = __init__
    ns["__record_fields__"] = tuple(flds)
    ns["__record_repr__"] = tuple(f.name for f in flds if f.repr)
    ns["__record_compare__"] = tuple(f.name for f in flds if f.compare)
    if "__repr__" not in cls.__dict__:
        ns["__repr__"] = _repr
    if "__eq__" not in cls.__dict__:
        ns["__eq__"] = _eq
    if "__hash__" not in cls.__dict__ or cls.__dict__["__hash__"] is None:
        ns["__hash__"] = _hash if frozen else None
    if frozen:
        ns["__setattr__"] = _frozen_setattr
        ns["__delattr__"] = _frozen_delattr
        ns["__setstate__"] = _frozen_setstate
    if not slots:
        for name, value in ns.items():
            if cls.__dict__.get(name, _MISSING) is not value:
                setattr(cls, name, value)
        for f in flds:
            if isinstance(cls.__dict__.get(f.name), Field):
                delattr(cls, f.name)
        made.append(cls)
        return cls
    ns["__slots__"] = tuple(f.name for f in flds)
    ns.pop("__dict__", None)
    ns.pop("__weakref__", None)
    new = type(cls)(cls.__name__, cls.__bases__, ns)
    new.__qualname__ = cls.__qualname__
    made.append(new)
    return new


# Record classes whose __init__ is still the compiling stub: (fields, frozen, qualname, [class], stub).
_uncompiled: list[tuple[list[Field], bool, str, list[type], object]] = []


def compile_pending() -> None:
    """Compile now the __init__ of every record class made so far that has not made an instance yet: for a
    process that forks workers (the service), so that each worker's first instances cost no exec."""
    while _uncompiled:
        flds, frozen, qualname, made, stub = _uncompiled.pop()
        if made and made[0].__dict__.get("__init__") is stub:
            made[0].__init__ = _compile_init(flds, frozen, qualname)  # type: ignore[misc]


COMPILE_AFTER = 32  # instances made by the generic __init__ before a class compiles its own


def _generic_init(flds: list[Field], frozen: bool):  # type: ignore[no-untyped-def]
    """An __init__ for any fields, binding arguments as the compiled one does (the same TypeErrors)."""
    names = [f.name for f in flds]
    known = set(names)
    setter = object.__setattr__ if frozen else setattr

    def init(self: object, *args: object, **kwargs: object) -> None:
        if len(args) > len(names):
            raise TypeError(f"__init__() takes {len(names) + 1} positional arguments but {len(args) + 1} were given")
        values = dict(zip(names, args, strict=False))  # fewer args than fields: the rest by keyword
        for k, v in kwargs.items():
            if k not in known:
                raise TypeError(f"__init__() got an unexpected keyword argument {k!r}")
            if k in values:
                raise TypeError(f"__init__() got multiple values for argument {k!r}")
            values[k] = v
        for f in flds:
            v = values.get(f.name, _MISSING)
            if v is _MISSING:
                if f.default_factory is not _MISSING:
                    v = f.default_factory()
                elif f.default is not _MISSING:
                    v = f.default
                else:
                    raise TypeError(f"__init__() missing 1 required positional argument: {f.name!r}")
            setter(self, f.name, v)
    return init


def _compile_init(flds: list[Field], frozen: bool, qualname: str):  # type: ignore[no-untyped-def]
    """The record's __init__, compiled as dataclasses compiles it, so that making an instance costs no more
    than a dataclass's (the uffd events are made once per fault)."""
    scope: dict[str, object] = {"_MISSING": _MISSING, "_set": object.__setattr__}
    params, body = [], []
    for f in flds:
        if f.default is not _MISSING:
            scope[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        elif f.default_factory is not _MISSING:
            scope[f"_f_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
        else:
            params.append(f.name)
        value = f"_f_{f.name}() if {f.name} is _MISSING else {f.name}" if f.default_factory is not _MISSING \
            else f.name
        body.append(f"    _set(self, {f.name!r}, {value})" if frozen else f"    self.{f.name} = {value}")
    src = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "    pass") + "\n"
    exec(src, scope)  # noqa: S102 - our own source, made from the class's field names
    init = scope["__init__"]
    init.__qualname__ = qualname  # type: ignore[attr-defined]
    return init
