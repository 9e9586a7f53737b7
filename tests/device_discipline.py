"""Device discipline on a CPU-only machine: find the tensors a GPU run would leave on the host.

Here the model, the data and every collective live on the CPU, so a tensor made without
``device=`` works, and the same line fails on CUDA ("Expected all tensors to be on the same
device") or NCCL (which refuses CPU tensors). ``device_discipline()`` finds these by provenance,
since on one device they cannot be found by their ``.device``:

* A *host tensor* is one made in project code (``specialize``, ``base``, ``code_qwen``,
  ``math_qwen``) by a factory (``torch.zeros``, ``ones``, ``empty``, ``full``, ``arange``,
  ``tensor``, ``as_tensor``, ``randn``, ``rand``, ``randint``, ``from_numpy``, ...) without
  ``device=`` (or with ``device="cpu"``), or by ``.cpu()`` there; and a tensor anyone places on
  ``x.device`` of a host tensor ``x``. The tag travels through every torch op: what is computed
  from host tensors only is a host tensor. ``.to(device)`` and ``.cuda()`` make a device tensor.
  Everything else (parameters, activations, whatever megatron-core or torch make) counts as being
  on the model's device. A *host generator* is a ``torch.Generator()`` made in project code
  without ``device=``.
* A *violation* is project or megatron-core code using a host tensor in one op with a device
  tensor, sampling device tensors (or a tensor made with ``device=``) with a host generator, or any
  code handing a host tensor to a ``torch.distributed`` collective. What CUDA itself allows is
  allowed: a 0-dim host tensor as a scalar operand (not in ``cat``/``stack``), host indices into a
  device tensor, and copies across devices (``copy_``, item assignment).

Why provenance rather than failing at every factory call without ``device=``: host tensors are
legitimate where they stay on the host (the data loader builds batches there and ``next_batch``
moves them; the parity gate's transformers reference runs on the CPU on purpose). Only mixing them
with the model's tensors, or handing them to NCCL, is the mistake, so that is where it fails: a
``DeviceError`` naming the file:line where the tensor was made and the file:line that misused it.
Ops called from other code (transformers, tests) are not checked; their results carry the tag on.

What it cannot see: a ``torch.device("cpu")`` written in project code (on this machine it is the
same object as the Topology's device), tensors made in other threads (DataLoader workers), and ops
that never reach Python (inside autograd's backward).

Mechanism: a ``TorchFunctionMode`` sees every torch function (factories, tensor methods and the
collectives ``send``/``recv``/``isend``/``irecv``/``broadcast``/``all_reduce``/``reduce``/
``all_gather``, which dispatch through it); ``torch.from_numpy``, ``torch.Generator`` and the
collectives that do not dispatch through it (``all_gather_into_tensor``, ``reduce_scatter*``,
``all_to_all*``, ``gather``, ``scatter``, ``batch_isend_irecv``) are wrapped where
``torch.distributed`` exports them while the check is on. The mode must be entered after
``specialize.mcore.cpu_bridge.install()`` (``init_distributed`` calls it) so that it sees device arguments
before the bridge rewrites them; where it sits on the mode stack when it leaves does not matter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

TAG = "_host_origin"
"""Attribute on a host tensor or generator: where it was made (``file:line what``)."""

PROJECT_PACKAGES = ("specialize", "base", "code_qwen", "math_qwen")
_TORCH = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)

_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.range, torch.linspace,
    torch.logspace, torch.eye, torch.tensor, torch.as_tensor, torch.asarray, torch.randn,
    torch.rand, torch.randint, torch.randperm, torch.empty_strided, torch.scalar_tensor,
}  # fmt: skip
_CONCAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack}
# Collectives that dispatch through torch functions (has_torch_function in distributed_c10d).
_DISPATCHED_COLLECTIVES = {
    getattr(dist.distributed_c10d, name)
    for name in (
        "send", "recv", "isend", "irecv", "broadcast", "all_reduce", "all_reduce_coalesced",
        "reduce", "all_gather",
    )
}  # fmt: skip
_WRAPPED_COLLECTIVES = (
    "all_gather_into_tensor", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "gather", "scatter",
    "batch_isend_irecv",
)  # fmt: skip


class DeviceError(AssertionError):
    """A tensor or generator on the host where a GPU run needs it on the model's device."""


def _package_dirs(names: Iterable[str]) -> tuple[str, ...]:
    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        dirs += [os.path.join(d, "") for d in (spec.submodule_search_locations or ())]
    return tuple(dirs)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _host(t: Any) -> str | None:
    return getattr(t, TAG, None)


def _tag(value: Any, origin: str | None) -> Any:
    for t in _tensors(value):
        setattr(t, TAG, origin)
    return value


def _name(func: Any) -> str:
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    module = getattr(func, "__module__", None) or ""
    if qualname.startswith("TensorBase.") or qualname.startswith("Tensor."):
        return "Tensor." + qualname.split(".", 1)[1]
    if module.startswith("torch.distributed"):
        return f"torch.distributed.{qualname}"
    return f"torch.{getattr(func, '__name__', qualname)}"


def _is_cpu_string(device: Any) -> bool:
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class _Discipline(TorchFunctionMode):
    def __init__(self, project: tuple[str, ...], checked: tuple[str, ...]) -> None:
        super().__init__()
        self.project, self.checked = project, checked
        self.violations: list[str] = []
        # id -> (the torch.device a host tensor's ``.device`` returned, where it was made); the
        # device is held so that its id is not reused.
        self.host_devices: dict[int, tuple[torch.device, str]] = {}

    # ---- where a call comes from

    def _caller(self, direct: bool = False) -> Any:
        """The innermost frame outside this module and torch: the code that made the call
        (``direct``: outside this module only, so that a tensor torch makes for itself, such as
        ``broadcast_object_list``'s buffer, is torch's and not its caller's)."""
        frame = sys._getframe(1)
        while frame is not None:
            file = frame.f_code.co_filename
            if file != _HERE and (direct or not file.startswith(_TORCH)):
                return frame
            frame = frame.f_back
        return None

    def _where(self, frame: Any) -> str:
        if frame is None:
            return "<unknown>"
        file = frame.f_code.co_filename
        for root in self.project + self.checked:
            if file.startswith(root):  # package/path/in/it.py, or a file's name
                rest = file[len(root) :]
                file = os.path.basename(root.rstrip(os.sep)) + (os.sep + rest if rest else "")
                break
        return f"{file}:{frame.f_lineno}"

    def _in(self, frame: Any, roots: tuple[str, ...]) -> bool:
        return frame is not None and frame.f_code.co_filename.startswith(roots)

    def _fail(self, message: str) -> None:
        self.violations.append(message)
        raise DeviceError(message)

    # ---- the mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DISPATCHED_COLLECTIVES:
            self.check_collective(_name(func), (args, kwargs))
            return func(*args, **kwargs)
        if func is torch.Tensor.to or func is torch.Tensor.cuda or func is torch.Tensor.cpu:
            return self._transfer(func, args, kwargs)
        if func in _FACTORIES and not any(True for _ in _tensors((args, kwargs))):
            return self._factory(func, args, kwargs)
        if kwargs.get("device") is not None:  # *_like, new_* with a placement
            return self._placed(func, args, kwargs)
        hosts = [t for t in _tensors((args, kwargs)) if _host(t) is not None]
        generator = kwargs.get("generator")
        if not hosts and _host(generator) is None:
            return func(*args, **kwargs)
        return self._mixed(func, args, kwargs, hosts, generator)

    def _factory(self, func, args, kwargs):
        """A tensor made from nothing: on the host unless project code said where."""
        if kwargs.get("device") is not None:
            return self._placed(func, args, kwargs)
        result = func(*args, **kwargs)
        frame = self._caller(direct=True)
        if self._in(frame, self.project):
            return _tag(result, f"{self._where(frame)} {_name(func)}() without device=")
        return _tag(result, _host(kwargs.get("generator")))  # a host generator's draws are too

    def _destination(self, device: Any, what: str) -> str | None:
        """The tag of a tensor that ``what`` puts on ``device``: the host for ``"cpu"`` written
        in project code and for the ``.device`` of a host tensor, else the model's device (None)."""
        held = self.host_devices.get(id(device))
        if held is not None and held[0] is device:
            where = self._where(self._caller())
            return f"{where} {what} (the device of a tensor made on the host at {held[1]})"
        if _is_cpu_string(device):
            frame = self._caller(direct=True)
            if self._in(frame, self.project):
                return f"{self._where(frame)} {what}"
        return None

    def _placed(self, func, args, kwargs):
        """A call with an explicit ``device=``: placed there, whatever its inputs were."""
        device, generator = kwargs["device"], kwargs.get("generator")
        origin = self._destination(device, f"{_name(func)}(device={device!r})")
        if _host(generator) is not None and origin is None and not _is_cpu_string(device):
            frame = self._caller()
            if self._in(frame, self.project + self.checked):
                self._fail(
                    f"{self._where(frame)}: {_name(func)}(device=...) draws from a generator made "
                    f"on the host at {_host(generator)}; make it with torch.Generator(device=...)"
                )
        return _tag(func(*args, **kwargs), origin)

    def _transfer(self, func, args, kwargs):
        """``.to``, ``.cuda``, ``.cpu``: the result's tag is its destination's."""
        source = args[0]
        if func is torch.Tensor.cuda:
            origin = None
        elif func is torch.Tensor.cpu:
            origin = self._destination("cpu", ".cpu()") or _host(source)
        else:
            target = kwargs.get("device")
            for arg in args[1:]:
                if target is None and not isinstance(arg, bool):
                    if isinstance(arg, (torch.Tensor, str, int, torch.device)):
                        target = arg
            if target is None:  # a dtype or memory format only: stays where it is
                origin = _host(source)
            elif isinstance(target, torch.Tensor):
                origin = _host(target)
            else:
                origin = self._destination(target, f".to({target!r})")
                if origin is None and _is_cpu_string(target):  # others' moves to the host
                    origin = _host(source)
        result = func(*args, **kwargs)
        if result is source and origin != _host(source):
            # On the CPU the move returns the tensor itself; a GPU run would hold a copy.
            result = source.view_as(source)
        return _tag(result, origin)

    def _mixed(self, func, args, kwargs, hosts, generator):
        """An op with a host tensor or generator among its inputs."""
        if getattr(func, "__self__", None) is torch.Tensor.device:  # a host tensor's .device
            device = func(*args, **kwargs)
            self.host_devices[id(device)] = (device, _host(args[0]))
            return device
        all_tensors = list(_tensors((args, kwargs)))
        devices = [t for t in all_tensors if _host(t) is None]
        if func is torch.Tensor.__setitem__ or func is torch.Tensor.copy_:
            return func(*args, **kwargs)  # copies across devices are fine
        if func is torch.Tensor.__getitem__:
            self_host = _host(args[0])
            if self_host is None:  # host indices into a device tensor are fine
                return _tag(func(*args, **kwargs), None)
            # a host tensor indexed by device indices
            hosts, devices = [args[0]], [t for t in devices if t is not args[0]]
        frame = None
        if _host(generator) is not None and devices:
            frame = self._caller()
            if self._in(frame, self.project + self.checked):
                self._fail(
                    f"{self._where(frame)}: {_name(func)} samples tensors on the model's device "
                    f"with a generator made on the host at {_host(generator)}; make it with "
                    "torch.Generator(device=...)"
                )
        if func in _CONCAT:
            blocking = hosts
        else:  # CUDA takes a 0-dim CPU tensor as a scalar operand
            blocking = [t for t in hosts if t.dim() > 0]
        if devices and blocking:
            frame = frame or self._caller()
            if self._in(frame, self.project + self.checked):
                self._fail(
                    f"{self._where(frame)}: {_name(func)} mixes a tensor made on the host at "
                    f"{_host(blocking[0])} with tensors on the model's device; make it with "
                    "device= the model's (or move it with .to(device))"
                )
        result = func(*args, **kwargs)
        if devices and not blocking:
            return _tag(result, None)
        return _tag(result, _host((blocking or hosts)[0]) if hosts else _host(generator))

    # ---- collectives

    def check_collective(self, name: str, value: Any) -> None:
        host = next((t for t in _tensors(value) if _host(t) is not None), None)
        if host is not None:
            self._fail(
                f"{self._where(self._caller())}: {name} is handed a tensor made on the host at "
                f"{_host(host)}; NCCL needs it on the model's device"
            )


def _wrap_collective(mode: _Discipline, name: str, original: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        value: Any = (args, kwargs)
        if name == "batch_isend_irecv":
            value = [op.tensor for op in (args[0] if args else kwargs["p2p_op_list"])]
        mode.check_collective(f"torch.distributed.{name}", value)
        return original(*args, **kwargs)

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def _generator_class(mode: _Discipline) -> type:
    real = torch.Generator

    class Meta(type(real)):
        # Generators made before the check, or by C++, are real ones: still ``torch.Generator``.
        def __instancecheck__(cls, obj: Any) -> bool:
            return isinstance(obj, real)

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, real)

    class Generator(real, metaclass=Meta):
        def __init__(self, device: Any = None) -> None:
            if device is None:
                frame = mode._caller(direct=True)
                origin = None
                if mode._in(frame, mode.project):
                    origin = f"{mode._where(frame)} torch.Generator() without device="
            else:
                origin = mode._destination(device, f"torch.Generator(device={device!r})")
            if origin is not None:
                setattr(self, TAG, origin)

    Generator.__name__ = Generator.__qualname__ = "Generator"
    return Generator


def _from_numpy(mode: _Discipline, original: Any) -> Any:
    def from_numpy(array: Any) -> torch.Tensor:
        result = original(array)
        frame = mode._caller(direct=True)
        if mode._in(frame, mode.project):
            setattr(result, TAG, f"{mode._where(frame)} torch.from_numpy()")
        return result

    return from_numpy


def _leave(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off the torch-function mode stack wherever it is (a mode entered after it,
    such as the CPU bridge's, stays)."""
    from torch._C import _len_torch_function_stack
    from torch.overrides import _pop_mode, _push_mode

    above = []
    for _ in range(_len_torch_function_stack()):
        top = _pop_mode()
        if top is mode:
            break
        above.append(top)
    for top in reversed(above):
        _push_mode(top)


@contextlib.contextmanager
def device_discipline(project: Iterable[str | Path] = ()) -> Iterator[_Discipline]:
    """Fail (``DeviceError``) where project code would put a tensor on the wrong device on a GPU
    (module docstring). ``project``: more files or directories to treat as project code."""
    extra = tuple(
        os.path.join(str(p), "") if Path(p).is_dir() else os.path.abspath(p) for p in project
    )
    mode = _Discipline(
        project=_package_dirs(PROJECT_PACKAGES) + extra, checked=_package_dirs(["megatron"])
    )
    patches: list[tuple[Any, str, Any]] = [
        (torch, "Generator", _generator_class(mode)),
        (torch, "from_numpy", _from_numpy(mode, torch.from_numpy)),
    ]
    for name in _WRAPPED_COLLECTIVES:
        original = getattr(dist, name)
        patches.append((dist, name, _wrap_collective(mode, name, original)))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    mode.__enter__()
    try:
        yield mode
    finally:
        _leave(mode)
        for owner, name, value in saved:
            setattr(owner, name, value)
    if mode.violations:  # raised where they happened; this catches one that was swallowed
        raise DeviceError(mode.violations[0])
