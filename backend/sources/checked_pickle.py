"""A stricter, slower unpickler for wafer-map pickles that are not the WM-811K distribution
(layer L1; run in the child process of ``pickle_sandbox``, never in a serving process).

``lswmd``'s allow-list stops a pickle from naming a dangerous function, but the admitted names still
corrupt memory when a pickle hands them crafted state:

* ``numpy.dtype`` + BUILD: a dtype whose state declares an object field, or an object dtype whose
  flags deny it holds references, lets ``_reconstruct`` + BUILD copy the file's raw bytes into
  PyObject pointers; reading the cell dereferences an address the file chose. A dtype or an array
  BUILT again after use changes under whatever already holds it.
* pandas' ``BlockManager`` (the 0.14.1 state LSWMD.pkl holds, or one made by a call): a block
  placed at a column the frame does not have makes pandas' column index, built without bounds
  checks, write outside its array.

``CheckedPandasUnpickler`` is pickle's pure-Python unpickler with the same allow-list
(``lswmd.resolve_admitted``) and these opcodes checked. It is 5-8x slower than the C unpickler:
~75 s for all of LSWMD.pkl (1.2 million dtypes and 2.4 million arrays to check) against 9-16 s.

* ``numpy.dtype(...)`` and ``_reconstruct(ndarray, (0,), b"b")`` give placeholders; the BUILD that
  follows makes the real dtype or array, checks it and puts it where the placeholder was (on the
  stack, and for each later memo read), so no half-made one is reachable and none is BUILT twice.
  A dtype must be unstructured, of kind bool, int, uint, float, complex, bytes, str or object
  (``DTYPE_KINDS``), with exactly the size, alignment and flags numpy gives that type; an array,
  ``scalar`` and ``_frombuffer`` take only a dtype made so in the same file (``_frombuffer`` no
  object one). ``numpy.ndarray`` itself cannot be called.
* Every ``BlockManager``, made by BUILD or by any call, must have blocks that cover each column
  exactly once, with values of (columns in the block, rows) shape.
* BUILD on anything else only for a ``DataFrame``; SETITEM(S), APPEND(S) and ADDITEMS fill only a
  dict, a list and a set.

What LSWMD.pkl builds, recorded by reading it so: dtypes ``|O``, ``<f8``, ``|u1``, ``<i8`` and
``<U3``-``<U9``; 2-D uint8 die maps, 2-D str label arrays and 2-D float (the empty label arrays and
the float block), 1-D object arrays (the column names) and one 2-D object block (its columns are
object arrays of those arrays and of lot names); BUILD on one BlockManager and one DataFrame. The
object kind is admitted for that; what the checks miss still only crashes the child process.
"""

from __future__ import annotations

import gc
import pickle
from collections.abc import Callable, Sequence
from typing import IO, Any, ClassVar

import numpy as np
import numpy.typing as npt
import pandas as pd
from pandas.core.internals.managers import BlockManager

from backend.sources.lswmd import resolve_admitted

DTYPE_KINDS = frozenset("biufcSUO")
#: pickle's pure-Python unpickler, whose opcode methods typeshed does not declare.
_BASE: Any = pickle._Unpickler
#: numpy's own functions for these calls, as its pickles name them (numpy._core in numpy 2).
_RECONSTRUCT: Any = np.zeros(1).__reduce__()[0]
_SCALAR: Any = np.float64(0).__reduce__()[0]
_FROMBUFFER: Any = np.zeros(1).__reduce_ex__(5)[0]
_DTYPE_STATE_VERSIONS = (3, 4)
#: The numpy names whose calls this unpickler makes itself (``lswmd`` admits both spellings).
_NUMPY_CALLS = {
    ("numpy", "dtype"): "_dtype",
    ("numpy", "ndarray"): "_ndarray",
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy.core.multiarray", "scalar"): "_scalar",
    ("numpy._core.multiarray", "scalar"): "_scalar",
    ("numpy.core.numeric", "_frombuffer"): "_frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "_frombuffer",
}


def _refusal(what: str) -> pickle.UnpicklingError:
    """The error for a pickle that builds ``what``, which no WM-811K frame holds."""
    return pickle.UnpicklingError(
        f"refusing {what} from a wafer-map file: a WM-811K frame holds none, and such state can "
        "corrupt memory (this file is not LSWMD.pkl as distributed, or was made to attack it)"
    )


class _Pending:
    """A dtype or array the pickle asked for, made only by the BUILD that gives it its state:
    ``made`` then holds it, and the memo hands that out instead of the placeholder."""

    __slots__ = ("args", "made")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.made: object = None


class _PendingDtype(_Pending):
    __slots__ = ()


class _PendingArray(_Pending):
    __slots__ = ()


_PENDING_TYPES = (_PendingDtype, _PendingArray)


def _ndarray(*args: object) -> None:
    """Stands for ``numpy.ndarray``: ``_reconstruct`` takes it; calling it is refused."""
    raise _refusal("a direct numpy.ndarray(...) call")


class CheckedPandasUnpickler(pickle._Unpickler):
    """``LegacyPandasUnpickler``'s names, with dtypes, arrays, frames and containers checked (see
    the module). ``load()`` raises ``pickle.UnpicklingError`` for anything refused."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # the unpickler's own working state (pickle._Unpickler)
    metastack: list[list[Any]]

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, encoding="latin1")
        self._dtypes: dict[int, np.dtype[Any]] = {}  # made here, by id; kept so ids stay unique

    def find_class(self, module: str, name: str) -> Any:
        module, name = resolve_admitted(module, name)
        own = _NUMPY_CALLS.get((module, name))
        if own == "_ndarray":
            return _ndarray
        if own is not None:
            return getattr(self, own)
        return super().find_class(module, name)

    # --- numpy calls, made here ------------------------------------------------------------

    def _dtype(self, *args: Any) -> _PendingDtype:
        if not 1 <= len(args) <= 3 or not isinstance(args[0], str):
            raise _refusal(f"to build dtype {args[:1]!r} (only a type code such as 'u1' or 'O8')")
        return _PendingDtype(args)

    def _reconstruct(self, subtype: object, shape: object, typecode: object) -> _PendingArray:
        if subtype is not _ndarray or shape != (0,) or typecode not in ("b", b"b"):
            raise _refusal(f"_reconstruct({subtype!r}, {shape!r}, {typecode!r})")
        return _PendingArray(())

    def _scalar(self, dtype: object, *value: object) -> Any:
        return _SCALAR(self._made_dtype(dtype, "a scalar"), *value)

    def _frombuffer(self, buffer: object, dtype: object, shape: object, order: object) -> Any:
        checked = self._made_dtype(dtype, "an array from a buffer")
        if checked.hasobject:
            raise _refusal("an object array from a raw buffer")
        return _FROMBUFFER(buffer, checked, shape, order)

    def _made_dtype(self, dtype: object, use: str) -> np.dtype[Any]:
        """``dtype`` when this unpickler made (and checked) it; refuses anything else."""
        made = self._dtypes.get(id(dtype))
        if made is None or made is not dtype:
            raise _refusal(f"{use} of dtype {dtype!r}, which is not a dtype built in this file")
        return made

    # --- opcodes ---------------------------------------------------------------------------

    def _load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, _Pending):
            state = self.stack.pop()
            if target.made is not None:
                raise _refusal("a second BUILD of one dtype or array")
            target.made = (
                self._build_dtype(target.args, state)
                if isinstance(target, _PendingDtype)
                else self._build_array(state)
            )
            self.stack[-1] = target.made
            return
        if isinstance(target, BlockManager):
            _check_manager_state(self.stack[-1])
        elif type(target) is not pd.DataFrame:
            raise _refusal(
                f"to give state to an existing {type(target).__name__} (only a new dtype or "
                "array, a DataFrame or its BlockManager take state)"
            )
        _BASE.load_build(self)

    def _build_dtype(self, args: tuple[Any, ...], state: object) -> np.dtype[Any]:
        _check_dtype_state(state)
        align = args[1] if len(args) > 1 else False
        try:
            dtype = np.dtype(args[0], align=bool(align), copy=True)  # never a shared dtype
            dtype.__setstate__(state)
            canonical = np.dtype(dtype.str)
        except (TypeError, ValueError, OverflowError) as err:
            raise _refusal(f"to build dtype {args[0]!r} with state {state!r} ({err})") from err
        if dtype.kind not in DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise _refusal(
                f"to build {dtype!r} (only bool, integer, float, complex, bytes, str and object)"
            )
        if _layout(dtype) != _layout(canonical) or dtype != canonical or dtype.metadata:
            raise _refusal(
                f"to build {dtype!r} with itemsize, alignment and flags {_layout(dtype)} "
                f"(numpy's own: {_layout(canonical)})"
            )
        self._dtypes[id(dtype)] = dtype
        return dtype

    def _build_array(self, state: object) -> npt.NDArray[Any]:
        if type(state) is not tuple or len(state) not in (4, 5):
            raise _refusal(f"an array state of another layout: {state!r:.200}")
        self._made_dtype(state[-3], "an array")
        array: npt.NDArray[Any] = _RECONSTRUCT(np.ndarray, (0,), b"b")
        try:
            array.__setstate__(state)
        except (TypeError, ValueError, OverflowError) as err:
            raise _refusal(f"an array state that numpy rejects ({err})") from err
        return array

    def _load_get(self) -> None:
        _BASE.load_get(self)
        self._made_for_placeholder()

    def _load_binget(self) -> None:
        _BASE.load_binget(self)
        self._made_for_placeholder()

    def _load_long_binget(self) -> None:
        _BASE.load_long_binget(self)
        self._made_for_placeholder()

    def _made_for_placeholder(self) -> None:
        """What a memo read put on the stack: a built placeholder's dtype or array, not itself."""
        value = self.stack[-1]
        if type(value) in _PENDING_TYPES and value.made is not None:
            self.stack[-1] = value.made

    def _load_reduce(self) -> None:
        _BASE.load_reduce(self)
        _check_made(self.stack[-1])

    def _load_newobj(self) -> None:
        _BASE.load_newobj(self)
        _check_made(self.stack[-1])

    def _load_newobj_ex(self) -> None:
        _BASE.load_newobj_ex(self)
        _check_made(self.stack[-1])

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        _BASE._instantiate(self, klass, args)
        _check_made(self.stack[-1])

    def _load_setitem(self) -> None:
        _check_filled(self.stack[-3], dict)
        _BASE.load_setitem(self)

    def _load_setitems(self) -> None:
        _check_filled(self.metastack[-1][-1], dict)
        _BASE.load_setitems(self)

    def _load_append(self) -> None:
        _check_filled(self.stack[-2], list)
        _BASE.load_append(self)

    def _load_appends(self) -> None:
        _check_filled(self.metastack[-1][-1], list)
        _BASE.load_appends(self)

    def _load_additems(self) -> None:
        _check_filled(self.metastack[-1][-1], set)
        _BASE.load_additems(self)

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.GET[0]] = _load_get
    dispatch[pickle.BINGET[0]] = _load_binget
    dispatch[pickle.LONG_BINGET[0]] = _load_long_binget
    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.ADDITEMS[0]] = _load_additems


def unpickle_checked(stream: IO[bytes]) -> object:
    """``CheckedPandasUnpickler`` on ``stream``: for any pickle but the distribution file.

    The garbage collector pauses meanwhile: it would scan the millions of objects being made
    again and again (~30% of the time) and finds no cycles among them.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        return CheckedPandasUnpickler(stream).load()
    finally:
        if collecting:
            gc.enable()


def _layout(dtype: np.dtype[Any]) -> tuple[int, int, int]:
    return dtype.itemsize, dtype.alignment, dtype.flags


def _check_dtype_state(state: object) -> None:
    """A dtype state numpy 1.x/2.x writes for an unstructured dtype: (version, byte order,
    subarray, names, fields, itemsize, alignment, flags[, metadata]), the three middle ones None."""
    if type(state) is not tuple or len(state) not in (8, 9):
        raise _refusal(f"to build a dtype with state {state!r}")
    if state[0] not in _DTYPE_STATE_VERSIONS or state[2:5] != (None, None, None):
        raise _refusal(f"to build a dtype with fields or a subarray (state {state!r})")
    if len(state) == 9 and state[8] is not None:
        raise _refusal(f"to build a dtype with metadata (state {state!r})")


def _check_filled(target: object, kind: type) -> None:
    if type(target) is not kind:
        raise _refusal(f"to fill a {type(target).__name__} as a {kind.__name__}")


def _check_made(made: object) -> None:
    """Check what a call or a class made: a ``BlockManager``'s blocks must fit its axes."""
    if not isinstance(made, BlockManager) or not made.blocks:
        return
    try:
        pairs = [(block.values, block.mgr_locs.indexer) for block in made.blocks]
    except (AttributeError, TypeError) as err:
        raise _refusal(f"a frame manager holding something else than blocks ({err})") from err
    _check_blocks(made.axes, pairs)


def _check_manager_state(state: object) -> None:
    """A ``BlockManager`` state as pandas >= 0.14.1 writes it: (axes, values, items, {"0.14.1":
    {"axes": [...], "blocks": [{"values": ..., "mgr_locs": ...}, ...]}})."""
    try:
        layout = state[3]["0.14.1"]  # type: ignore[index]
        axes, blocks = layout["axes"], layout["blocks"]
        pairs = [(block["values"], block["mgr_locs"]) for block in blocks]
    except (TypeError, KeyError, IndexError) as err:
        raise _refusal(f"a frame manager state of another layout ({err!r})") from err
    _check_blocks(axes, pairs)


def _check_blocks(axes: object, blocks: Sequence[tuple[object, object]]) -> None:
    """Refuse blocks that do not cover the columns of ``axes`` exactly once, with values of
    (columns in the block, rows) shape."""
    try:
        if not isinstance(axes, list | tuple) or len(axes) != 2:
            raise _refusal(f"a frame with axes {axes!r}")
        columns, rows = len(axes[0]), len(axes[1])
        covered = np.zeros(columns, dtype=np.int64)
        for values, placement in blocks:
            positions = _positions(placement, columns)
            shape = values.shape if isinstance(values, np.ndarray) else None
            if shape != (positions.size, rows):
                raise _refusal(
                    f"a frame whose block of shape {shape} sits at {positions.size} of its "
                    f"{columns} columns x {rows} rows"
                )
            np.add.at(covered, positions, 1)
    except (TypeError, ValueError, OverflowError) as err:
        raise _refusal(f"a frame whose blocks cannot be checked ({err})") from err
    if (covered != 1).any():
        raise _refusal(f"a frame whose blocks do not cover its {columns} columns once each")


def _positions(placement: object, columns: int) -> npt.NDArray[np.int64]:
    """The column positions ``placement`` (a slice or integer array) names, all in ``columns``."""
    if isinstance(placement, slice):
        start, stop, step = placement.start, placement.stop, placement.step
        start, step = 0 if start is None else start, 1 if step is None else step
        if not all(isinstance(v, int | np.integer) for v in (start, stop, step)):
            raise _refusal(f"a frame whose block is placed at {placement!r}")
        if not (start >= 0 and stop <= columns and step >= 1):
            raise _refusal(
                f"a frame whose block is placed at {placement!r}, outside {columns} columns"
            )
        return np.arange(start, stop, step, dtype=np.int64)
    positions = np.asarray(placement)
    if positions.dtype.kind not in "iu" or positions.ndim != 1:
        raise _refusal(f"a frame whose block is placed at {type(placement).__name__}")
    if positions.size and (positions.min() < 0 or positions.max() >= columns):
        raise _refusal(
            f"a frame whose block is placed at columns {positions.min()}..{positions.max()}, "
            f"outside its {columns} columns"
        )
    return positions.astype(np.int64)
