"""Zero-copy conversion of one tensor between torch and JAX, through the DLPack protocol.

Both directions hand over the same memory; stream order is kept by the protocol itself: JAX asks
torch to make JAX's stream wait for torch's pending work on the tensor, and torch asks JAX to
make torch's current stream wait for the JAX computation that produces an array.
"""

from __future__ import annotations

import torch

from . import _jax_env  # noqa: F401  (sets XLA_PYTHON_CLIENT_PREALLOCATE before JAX starts)
import jax

# torch dtypes that cross to JAX unchanged. float8, complex32 (chalf), and the unsigned/bit types
# that JAX or DLPack cannot take are refused with a TypeError (see ``check_dtype``).
SUPPORTED_DTYPES = frozenset({
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
})
WIDE_DTYPES = frozenset({torch.float64, torch.complex128, torch.int64})  # need JAX's x64 mode

_DL_CPU, _DL_CUDA = 1, 2
_CPU_ALIGNMENT = 64   # XLA:CPU copies (or refuses) buffers whose address is not 64-byte aligned


def check_dtype(t: torch.Tensor, name: str = "tensor") -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}, which the bridge does not pass to JAX "
            f"(supported: {', '.join(sorted(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES))})")


def check_device(t: torch.Tensor, name: str = "tensor") -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on device {t.device}; the bridge handles cpu and cuda tensors")


def prepare(t: torch.Tensor) -> torch.Tensor:
    """The tensor as DLPack can export it: detached, conj/neg bits resolved, dense row-major.

    Only makes a copy when the layout requires one (a view with strides, a conj/neg view, or a
    CPU buffer that is not 64-byte aligned).
    """
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type == "cpu" and t.data_ptr() % _CPU_ALIGNMENT and t.numel():
        t = t.clone()
    return t


class _Importer:
    """torch tensor -> jax.Array, by jaxlib's DLPack import (the public jax.dlpack.from_dlpack
    spends ~90 us per call in Python and silently narrows 64-bit dtypes when x64 is off)."""

    def __init__(self):
        self._devices = {}     # (dl device type, id) -> (jax device, stream for external ready events)
        self._fast = None

    def _device(self, dl_type: int, dl_id: int):
        key = (dl_type, dl_id)
        found = self._devices.get(key)
        if found is None:
            from jax._src import xla_bridge
            platform = "cpu" if dl_type == _DL_CPU else "cuda"
            try:
                backend = xla_bridge.get_backend(platform)
            except RuntimeError as e:
                raise ValueError(
                    f"a {platform} tensor was passed, but JAX has no {platform} backend ({e}). "
                    "For CUDA tensors install a CUDA build of JAX: pip install 'gateloop-hybrid[cuda]'"
                ) from None
            device = backend.device_from_local_hardware_id(dl_id)
            stream = None
            if dl_type == _DL_CUDA:
                stream = device.get_stream_for_external_ready_events()
            found = self._devices[key] = (device, stream)
        return found

    def __call__(self, t: torch.Tensor) -> jax.Array:
        dl_type, dl_id = t.__dlpack_device__()
        device, stream = self._device(int(dl_type), dl_id)
        if dl_type == _DL_CUDA and torch.cuda.current_device() != dl_id:
            with torch.cuda.device(dl_id):   # torch only exports tensors of its current device
                capsule = t.__dlpack__(stream=stream)
        else:
            capsule = t.__dlpack__(stream=stream) if stream is not None else t.__dlpack__()
        if self._fast is None:
            self._fast = _find_fast_import()
        if self._fast is not False:
            return self._fast(capsule, device, stream, int(dl_type))
        # Public path: full width only inside x64 mode.
        with jax.enable_x64(t.dtype in WIDE_DTYPES):
            return jax.dlpack.from_dlpack(t, copy=False)


def _find_fast_import():
    try:
        from jax._src.lib import _jax, jaxlib_extension_version
    except ImportError:
        return False
    fn = getattr(_jax, "dlpack_managed_tensor_to_buffer", None)
    if fn is None:
        return False
    if jaxlib_extension_version >= 467:
        return lambda capsule, device, stream, dl_type: fn(capsule, device, stream, False, dl_type)
    return lambda capsule, device, stream, dl_type: fn(capsule, device, stream, False)


_import = _Importer()


def to_jax(tensor: torch.Tensor, *, name: str = "tensor") -> jax.Array:
    """A jax.Array sharing ``tensor``'s memory (a copy only where the layout requires one, see
    ``prepare``). 64-bit dtypes stay 64-bit. Do not write to the tensor while JAX may still read it.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    check_dtype(tensor, name)
    check_device(tensor, name)
    return _import(prepare(tensor))


def to_torch(array: jax.Array) -> torch.Tensor:
    """A torch tensor sharing ``array``'s memory, on the array's device, ordered after the JAX work
    that produces it (torch passes its current stream through DLPack)."""
    if not isinstance(array, jax.Array):
        raise TypeError(f"expected a jax.Array, got {type(array).__name__}")
    return torch.from_dlpack(array)
