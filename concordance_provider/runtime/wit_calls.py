"""Calls between the host and a component whose WIT types are reflected once, when it is loaded.

wasmtime-py's ``Func.__call__`` reflects the function's type on every call: the parameter and
result types, each record's fields, each option's and result's cases, each one a type handle
allocated and freed through C, in Python, under the GIL. Its trampoline for host functions added
with ``LinkerInstance.add_func`` does the same on every call the component makes to the host.
``compile_call`` walks an export's type once into converters that lower arguments and lift results
the way wasmtime-py does, giving the same Python values and raising the same errors;
``add_host_func`` registers a host function whose parameters are lifted and result lowered by the
same converters, compiled from the type the component imports it with. A function with a type not
handled here keeps wasmtime-py's own call or ``add_func``.

This relies on wasmtime-py internals (``Func._func``, ``_tagged()``, ``enter_wasm`` and
``catch_exceptions``, the C callback ``add_func`` registers, ``Slab``), which is why the project
pins wasmtime >=50,<51: a new major version must be checked against this module.
"""

from __future__ import annotations

import ctypes
from ctypes import CFUNCTYPE, byref, c_char_p, c_size_t, c_void_p, create_string_buffer, pointer, string_at
from typing import Any, Callable, NamedTuple, Optional, Sequence

from wasmtime import Engine, Storelike, StoreContext, WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime._slab import Slab
from wasmtime.component import (
    F32, F64, S8, S16, S32, S64, U8, U16, U32, U64, Bool, Char, Component, ComponentInstanceType, EnumType,
    FlagsType, Func, FuncType, LinkerInstance, ListType, OptionType, Record, RecordType, ResultType, String,
    TupleType, ValType, Variant, VariantType,
)
# private, like Func._func and _tagged(): wasmtime is pinned to 50.x
from wasmtime.component._enter import catch_exceptions, enter_wasm

Val = ffi.wasmtime_component_val_t
Lower = Callable[[Storelike, Any, Any], None]  # (store, value, C value to fill)
Lift = Callable[[Any], Any]  # C value -> Python value; takes what the C value owns
Call = Callable[..., Any]  # (store, *args) -> result, like Func.__call__
HostFunc = Callable[..., Any]  # (store, *params) -> result, as LinkerInstance.add_func takes it
# (store, C arguments, their count, C results, their count): lifts, calls the host function, lowers
Trampoline = Callable[[StoreContext, Any, int, Any, int], None]

BOOL = ffi.WASMTIME_COMPONENT_BOOL.value
STRING = ffi.WASMTIME_COMPONENT_STRING.value
LIST = ffi.WASMTIME_COMPONENT_LIST.value
RECORD = ffi.WASMTIME_COMPONENT_RECORD.value
TUPLE = ffi.WASMTIME_COMPONENT_TUPLE.value
VARIANT = ffi.WASMTIME_COMPONENT_VARIANT.value
OPTION = ffi.WASMTIME_COMPONENT_OPTION.value
RESULT = ffi.WASMTIME_COMPONENT_RESULT.value

# Types whose wasmtime-py conversion reflects nothing: their own methods are used as they are.
LEAVES = (Bool, S8, S16, S32, S64, U8, U16, U32, U64, F32, F64, Char, EnumType, FlagsType)

# wasm_byte_vec_new declared to take Python bytes as they are: one C call per string, where
# wasmtime-py's str_to_capi allocates, copies into an intermediate array, then copies again.
_new_byte_vec = ctypes.CFUNCTYPE(None, c_void_p, c_size_t, c_char_p)(("wasm_byte_vec_new", ffi.dll))


class Unsupported(Exception):
    """A WIT type without converters here."""


class Converter(NamedTuple):
    lower: Lower
    lift: Lift


def compile_call(func: Func, store: Storelike) -> Call:
    """``func``'s call with its type reflected now; ``func`` itself if a type is not handled."""
    func_type = func.type(store)
    try:
        lowers = [converter(ty).lower for _, ty in func_type.params]
        result = func_type.result
        lift = converter(result).lift if result is not None else None
    except Unsupported:
        return func
    return _call(func, lowers, lift)


def _call(func: Func, lowers: Sequence[Lower], lift: Optional[Lift]) -> Call:
    """Func.__call__ with the converters given: C arguments are deleted after the call, as there."""
    func_ref = byref(func._func)
    count = len(lowers)
    Args = Val * count

    def call(store: Storelike, *args: Any) -> Any:
        if len(args) != count:
            raise TypeError("wrong number of parameters provided: given %s, expected %s" % (len(args), count))
        raw_args = Args()
        lowered = 0
        try:
            for lower, arg in zip(lowers, args):
                lower(store, arg, raw_args[lowered])
                lowered += 1
            result = Val() if lift is not None else None
            result_ref = byref(result) if result is not None else None
            enter_wasm(lambda: ffi.wasmtime_component_func_call(
                func_ref, store._context(), raw_args, lowered, result_ref, 0 if result is None else 1))
            return None if lift is None else lift(result)
        finally:
            for index in range(lowered):
                ffi.wasmtime_component_val_delete(byref(raw_args[index]))

    return call


# -- host functions: what the component imports ----------------------------------------------------

def imported_funcs(component: Component, engine: Engine, instance: Optional[str] = None) -> dict[str, FuncType]:
    """The types of the functions ``component`` imports from ``instance`` (None: at its root),
    by name; none if it does not import ``instance``."""
    imports = component.type.imports(engine)
    if instance is not None:
        extern = imports.get(instance)
        instance_type = extern.ty if extern is not None else None
        if not isinstance(instance_type, ComponentInstanceType):
            return {}
        imports = instance_type.exports(engine)
    found = {}
    for name, extern in imports.items():
        item = extern.ty
        if isinstance(item, FuncType):
            found[name] = item
    return found


def add_host_func(instance: LinkerInstance, name: str, func: HostFunc, func_type: Optional[FuncType]) -> bool:
    """Define ``name`` in ``instance`` as ``func``, like ``instance.add_func``, with its parameters
    lifted and its result lowered by converters compiled from ``func_type``: the type the one
    component this linker instantiates imports it with (see ``imported_funcs``). Without a type,
    or with one not handled here, it is ``add_func`` itself. True if the converters were compiled."""
    trampoline = _compiled(func, func_type)
    if trampoline is None:
        instance.add_func(name, func)
        return False
    instance._assert_not_locked()
    encoded = name.encode("utf-8")
    index = _TRAMPOLINES.allocate(trampoline)
    error = ffi.wasmtime_component_linker_instance_add_func(
        instance.ptr(), create_string_buffer(encoded), len(encoded), _host_callback, index, _host_finalize)
    if error:
        raise WasmtimeError._from_ptr(error)
    return True


def _compiled(func: HostFunc, func_type: Optional[FuncType]) -> Optional[Trampoline]:
    if func_type is None:
        return None
    try:
        return _trampoline(func, func_type)
    except Unsupported:
        return None


def _trampoline(func: HostFunc, func_type: FuncType) -> Trampoline:
    """What wasmtime-py's ``func_impl`` does on each call, with the types reflected now."""
    lifts = [converter(ty).lift for _, ty in func_type.params]
    result = func_type.result
    lower = converter(result).lower if result is not None else None
    count, result_count = len(lifts), 0 if lower is None else 1

    def run(store: StoreContext, args: Any, nargs: int, results: Any, nresults: int) -> None:
        # wasmtime passes what the import's type says; func_impl asserts it, and so does this
        if nargs != count or nresults != result_count:
            raise AssertionError(f"host function given {nargs} arguments and {nresults} result slots; "
                                 f"its type has {count} and {result_count}")
        # each lift takes what its C argument owns, as convert_from_c does; wasmtime frees the rest
        value = func(store, *[lift(args[index]) for index, lift in enumerate(lifts)])
        if lower is not None:
            lower(store, value, results[0])
        elif value is not None:
            raise AssertionError(f"host function without a result returned a {type(value).__name__}")

    return run


# Each registered host function's trampoline, by the index wasmtime hands back to the callback.
_TRAMPOLINES: Slab[Trampoline] = Slab()


@ffi.wasmtime_component_func_callback_t  # type: ignore[misc]
def _host_callback(index: Optional[int], context: Any, _ty: Any, args: Any, nargs: int, results: Any,
                   nresults: int) -> int:
    # _ty, the import's type, is not reflected: the trampoline was compiled from it at registration.
    # catch_exceptions, as func_impl: an exception from the host function is kept and raised again
    # to the export's caller by enter_wasm (a WasmtimeError is the trap itself)
    return catch_exceptions(  # type: ignore[return-value]
        context, lambda store: _TRAMPOLINES.get(index or 0)(store, args, nargs, results, nresults))


@CFUNCTYPE(None, c_void_p)  # type: ignore[misc]
def _host_finalize(index: Optional[int]) -> None:
    if _TRAMPOLINES is not None:  # a module global is None while the interpreter shuts down
        _TRAMPOLINES.deallocate(index or 0)


# -- converters ------------------------------------------------------------------------------------

def converter(ty: ValType) -> Converter:
    """Lowering and lifting for ``ty``, with everything about the type looked up now."""
    if isinstance(ty, String):
        return Converter(_lower_string, _lift_string)
    if isinstance(ty, LEAVES):
        return _leaf(ty)
    if isinstance(ty, RecordType):
        return _record(ty)
    if isinstance(ty, ListType):
        return _list(ty)
    if isinstance(ty, TupleType):
        return _tuple(ty)
    if isinstance(ty, OptionType):
        return _option(ty)
    if isinstance(ty, ResultType):
        return _result(ty)
    if isinstance(ty, VariantType):
        return _variant(ty)
    raise Unsupported(type(ty).__name__)


def _blank(val: Any) -> None:
    """Mark a C value whose contents were taken (or never made), so deleting it frees nothing."""
    val.kind = BOOL
    val.of.boolean = False


def _set_bytes(vec: Any, data: bytes) -> None:
    _new_byte_vec(byref(vec), len(data), data)


def _lower_string(store: Storelike, val: Any, dst: Any) -> None:
    if not isinstance(val, str):
        raise TypeError("expected string type")
    dst.kind = STRING
    _set_bytes(dst.of.string, val.encode("utf8"))


def _lift_string(c: Any) -> str:
    assert c.kind == STRING
    vec = c.of.string
    text = string_at(vec.data, vec.size).decode("utf-8")
    ffi.wasm_byte_vec_delete(byref(vec))
    return text


def _leaf(ty: ValType) -> Converter:
    def lower(store: Storelike, val: Any, dst: Any) -> None:
        ty.convert_to_c(store, val, pointer(dst))

    return Converter(lower, ty.convert_from_c)


def _record(ty: RecordType) -> Converter:
    fields = [(name, name.encode("utf8"), converter(field)) for name, field in ty.fields]
    size = len(fields)

    def lower(store: Storelike, val: Any, dst: Any) -> None:
        raw = ffi.wasmtime_component_valrecord_t()
        ffi.wasmtime_component_valrecord_new_uninit(raw, size)
        data = raw.data
        done = 0
        try:
            for name, encoded, field in fields:
                entry = data[done]
                field.lower(store, getattr(val, name), entry.val)
                _set_bytes(entry.name, encoded)
                done += 1
            dst.kind = RECORD
            dst.of.record = raw
        except BaseException:
            for index in range(done, size):
                _blank(data[index].val)
            ffi.wasmtime_component_valrecord_delete(byref(raw))
            raise

    def lift(c: Any) -> Record:
        assert c.kind == RECORD
        raw = c.of.record
        try:
            record = Record()
            values = record.__dict__
            data = raw.data
            # wasmtime gives the fields in the type's order (wasmtime-py asserts each name)
            for index, (name, _, field) in zip(range(raw.size), fields):
                val = data[index].val
                values[name] = field.lift(val)
                _blank(val)
            return record
        finally:
            ffi.wasmtime_component_valrecord_delete(raw)

    return Converter(lower, lift)


def _lower_items(items: Any, lower: Callable[[int, Any, Any], None], raw: Any,
                 delete: Callable[[Any], None]) -> None:
    """Lower ``items`` into the new C vector ``raw``; on failure free it, blanking what was not made."""
    data = raw.data
    done = 0
    try:
        for item in items:
            lower(done, item, data[done])
            done += 1
    except BaseException:
        for index in range(done, len(items)):
            _blank(data[index])
        delete(byref(raw))
        raise


def _list(ty: ListType) -> Converter:
    element_type = ty.element
    element = converter(element_type)
    is_bytes = isinstance(element_type, U8)  # list<u8> is bytes in Python, as in wasmtime-py

    def lower(store: Storelike, val: Any, dst: Any) -> None:
        if is_bytes:
            if not isinstance(val, bytes):
                raise TypeError("expected bytes value")
        elif not isinstance(val, list):
            raise TypeError("expected list value")
        raw = ffi.wasmtime_component_vallist_t()
        ffi.wasmtime_component_vallist_new_uninit(raw, len(val))
        _lower_items(val, lambda _, item, slot: element.lower(store, item, slot), raw,
                     ffi.wasmtime_component_vallist_delete)
        dst.kind = LIST
        dst.of.list = raw

    def lift(c: Any) -> Any:
        assert c.kind == LIST
        raw = c.of.list
        try:
            data, items = raw.data, []
            for index in range(raw.size):
                val = data[index]
                items.append(element.lift(val))
                _blank(val)
            return bytes(items) if is_bytes else items
        finally:
            ffi.wasmtime_component_vallist_delete(byref(raw))

    return Converter(lower, lift)


def _tuple(ty: TupleType) -> Converter:
    elements = [converter(element) for element in ty.elements]
    size = len(elements)

    def lower(store: Storelike, val: Any, dst: Any) -> None:
        if not isinstance(val, tuple):
            raise TypeError("expected tuple type")
        if len(val) != size:
            raise TypeError("tuple length mismatch")
        raw = ffi.wasmtime_component_valtuple_t()
        ffi.wasmtime_component_valtuple_new_uninit(raw, size)
        _lower_items(val, lambda index, item, slot: elements[index].lower(store, item, slot), raw,
                     ffi.wasmtime_component_valtuple_delete)
        dst.kind = TUPLE
        dst.of.tuple = raw

    def lift(c: Any) -> tuple[Any, ...]:
        assert c.kind == TUPLE
        raw = c.of.tuple
        try:
            data, items = raw.data, []
            for index, element in zip(range(raw.size), elements):
                val = data[index]
                items.append(element.lift(val))
                _blank(val)
            return tuple(items)
        finally:
            ffi.wasmtime_component_valtuple_delete(byref(raw))

    return Converter(lower, lift)


class _Case(NamedTuple):
    name: str
    payload: Optional[Converter]
    classes: tuple[type, ...]  # the Python types that choose this case when the variant is untagged


class _Cases:
    """The cases of a variant, option or result, chosen and read as wasmtime-py's VariantLikeType
    does: untagged (the bare payload, or None) unless two cases take the same Python type."""

    def __init__(self, ty: Any, cases: Sequence[tuple[str, Optional[ValType]]]) -> None:
        self.cases = [_Case(name, None if case is None else converter(case), _classes(case))
                      for name, case in cases]
        self.tagged: bool = ty._tagged()
        self.by_name: dict[str, _Case] = {}
        for case in self.cases:
            self.by_name.setdefault(case.name, case)

    def lower(self, store: Storelike, val: Any) -> tuple[str, Any]:
        """The case ``val`` is, and its payload boxed in C (None: no payload)."""
        tagged = self.tagged
        if tagged and not isinstance(val, Variant):
            raise TypeError("expected Variant type")
        for name, payload, classes in self.cases:
            if tagged:
                if name != val.tag:
                    continue
            elif payload is None:
                if val is not None:
                    continue
            elif not isinstance(val, classes):
                continue
            if payload is None:
                return name, None
            raw = Val()
            payload.lower(store, val.payload if tagged else val, raw)
            return name, ffi.wasmtime_component_val_new(byref(raw))
        raise ValueError("value not valid for this variant")

    def lift(self, tag: str, boxed: Any) -> Any:
        case = self.by_name.get(tag)
        if case is None:
            raise ValueError(f"tag {tag} not found in variant cases")
        if case.payload is None:
            return Variant(tag) if self.tagged else None
        val = boxed.contents
        payload = case.payload.lift(val)
        _blank(val)
        ffi.wasmtime_component_val_delete(boxed)
        return Variant(tag, payload) if self.tagged else payload


def _classes(ty: Optional[ValType]) -> tuple[type, ...]:
    if ty is None:
        return (object,)
    found: set[type] = set()
    ty.add_classes(found)
    return tuple(found)


def _option(ty: OptionType) -> Converter:
    cases = _Cases(ty, [("none", None), ("some", ty.payload)])

    def lower(store: Storelike, val: Any, dst: Any) -> None:
        _, boxed = cases.lower(store, val)
        dst.kind = OPTION
        dst.of.option = boxed

    def lift(c: Any) -> Any:
        assert c.kind == OPTION
        boxed = c.of.option
        return cases.lift("some" if boxed else "none", boxed)

    return Converter(lower, lift)


def _result(ty: ResultType) -> Converter:
    cases = _Cases(ty, [("ok", ty.ok), ("err", ty.err)])

    def lower(store: Storelike, val: Any, dst: Any) -> None:
        name, boxed = cases.lower(store, val)
        dst.kind = RESULT
        dst.of.result.is_ok = name == "ok"
        dst.of.result.val = boxed

    def lift(c: Any) -> Any:
        assert c.kind == RESULT
        result = c.of.result
        return cases.lift("ok" if result.is_ok else "err", result.val)

    return Converter(lower, lift)


def _variant(ty: VariantType) -> Converter:
    cases = _Cases(ty, ty.cases)
    encoded = {case.name: case.name.encode("utf8") for case in cases.cases}

    def lower(store: Storelike, val: Any, dst: Any) -> None:
        name, boxed = cases.lower(store, val)
        dst.kind = VARIANT
        _set_bytes(dst.of.variant.discriminant, encoded[name])
        dst.of.variant.val = boxed

    def lift(c: Any) -> Any:
        assert c.kind == VARIANT
        variant = c.of.variant
        tag = ffi.to_str(variant.discriminant)
        ffi.wasm_byte_vec_delete(byref(variant.discriminant))
        return cases.lift(tag, variant.val)

    return Converter(lower, lift)
