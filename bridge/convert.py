"""Zero-copy conversion of one tensor between torch and JAX, through the DLPack protocol.

Both directions hand over the same memory; stream order is kept by the protocol itself: JAX asks
torch to make JAX's stream wait for torch's pending work on the tensor, and torch asks JAX to
make torch's current stream wait for the JAX computation that produces an array.

Devices are matched by the GPU itself, not by position: torch's cuda:i is CUDA device ordinal i
of this process, and JAX's GPU device with ``local_hardware_id`` i is the same GPU (both count
the GPUs that CUDA_VISIBLE_DEVICES leaves, in CUDA's order). Positions differ as soon as JAX
sees only some GPUs (a torchrun rank's JAX sees only its own, see ``_jax_env``): its one device
is ``jax.devices()[0]`` whatever GPU it is. See ``jax_gpu_for`` and ``torch_index_of``.
"""

from __future__ import annotations

import torch

from . import _jax_env  # (sets XLA_PYTHON_CLIENT_PREALLOCATE before JAX starts)
import jax

_jax_env.restrict_gpus()
_jax_env.cpu_dispatch()

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


def check_layout(t: torch.Tensor, name: str = "tensor") -> None:
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor; the bridge passes dense (strided) tensors only "
                        "(pad it, or call once per component)")
    if t.layout is not torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; the bridge passes dense (strided) tensors only "
                        "(convert with .to_dense())")


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


def jax_gpu_for(index: int, jax_gpus):
    """JAX's device for torch's cuda:``index``, among ``jax_gpus`` (JAX's GPU devices of this
    process): the one on the same GPU, whose CUDA device ordinal (``local_hardware_id``) is
    ``index``. ValueError, saying which GPUs JAX uses, when it does not use that one."""
    for device in jax_gpus:
        if device.local_hardware_id == index:
            return device
    seen = sorted(d.local_hardware_id for d in jax_gpus)
    raise ValueError(
        f"a tensor on cuda:{index} was passed, but JAX in this process uses "
        + (f"only GPU(s) {', '.join(f'cuda:{i}' for i in seen)}" if seen else "no GPU")
        + ". Under torchrun each process's JAX uses its rank's GPU, cuda:LOCAL_RANK: keep the tensors there, "
        f"or set {_jax_env._GPUS_VAR}=all (or a list of GPU indices) before the bridge is imported")


def torch_index_of(jax_device) -> int:
    """torch's CUDA device index for a JAX GPU device (the inverse of ``jax_gpu_for``)."""
    return jax_device.local_hardware_id


class _Exchange:
    """Moves tensors to JAX and arrays to torch through jaxlib's DLPack entry points.

    The public ``jax.dlpack.from_dlpack`` spends ~60-90 us per call in Python (and narrows 64-bit
    dtypes when x64 is off); ``torch.from_dlpack`` and ``Tensor.__dlpack__(stream=...)`` each create
    stream and event objects per tensor. Here one call's tensors share one stream hand-off: torch's
    current stream records one event, JAX's stream for external buffers waits on it, and the
    tensors are then exported without further synchronization. Falls back to the public
    functions if jaxlib's entry points are missing (they are private and may move).
    """

    def __init__(self):
        self._links = {}       # torch.device -> _DeviceLink
        self._fast = None

    def fast(self):
        if self._fast is None:
            self._fast = _find_fast_paths()
        return self._fast

    def to_jax(self, tensors, *, one_computation: bool = False):
        """Prepared tensors (all on one device) -> jax.Arrays sharing their memory.

        ``one_computation``: the arrays are read only by the one JAX computation that the caller
        runs next (and by later work on JAX's stream). On CUDA the first array then carries the
        definition event for all of them: the computation waits for it before it starts, so the
        others need none, and each one skipped saves ~8 us of event bookkeeping in PJRT.
        """
        if not tensors:
            return []
        device = tensors[0].device
        link = self._links.get(device)
        if link is None:
            dl_type, dl_id = tensors[0].__dlpack_device__()
            link = self._links[device] = _DeviceLink(int(dl_type), dl_id)
        fast = self.fast()
        if not fast:
            return [self._to_jax_public(t) for t in tensors]
        import_fn, _ = fast
        jax_device, dl_type = link.jax_device, link.dl_type
        # torch._C._to_dlpack: the capsule without Tensor.__dlpack__'s Python checks and stream
        # handling (prepare() did the checks; the order is kept below). 5 us -> 0.5 us a tensor.
        capsules = [_to_dlpack(t) for t in tensors]
        if not link.cuda:
            return [import_fn(c, jax_device, None, dl_type) for c in capsules]
        link.torch_to_jax_order()
        if one_computation:
            first = import_fn(capsules[0], jax_device, link.jax_stream, dl_type)
            return [first, *(import_fn(c, jax_device, None, dl_type) for c in capsules[1:])]
        return [import_fn(c, jax_device, link.jax_stream, dl_type) for c in capsules]

    @staticmethod
    def _to_jax_public(t):
        with jax.enable_x64(t.dtype in WIDE_DTYPES):
            return jax.dlpack.from_dlpack(t, copy=False)

    def to_torch(self, arrays):
        """jax.Arrays (all on one device) -> torch tensors sharing their memory, ordered after
        the JAX work that produces them."""
        fast = self.fast()
        if not fast or not arrays:
            return [torch.from_dlpack(a) for a in arrays]
        _, export_fn = fast
        first = arrays[0]
        device = first.sharding._device if hasattr(first.sharding, "_device") else next(iter(first.devices()))
        stream = None
        if device.platform != "cpu":
            # JAX makes torch's current stream (of the arrays' device) wait for the arrays.
            stream = torch._C._cuda_getCurrentRawStream(torch_index_of(device)) or 1
        return [_from_dlpack(export_fn(a, stream)) for a in arrays]


class _DeviceLink:
    """What the exchange needs per device: JAX's device, JAX's stream for external buffers and,
    on CUDA, that stream as a torch stream plus one reusable event to order it after torch's."""

    def __init__(self, dl_type: int, dl_id: int):
        from ._jax_private import xla_backend
        self.dl_type, self.dl_id = dl_type, dl_id
        self.cuda = dl_type == _DL_CUDA
        platform = "cuda" if self.cuda else "cpu"
        try:
            backend = xla_backend(platform)
        except RuntimeError as e:
            raise ValueError(
                f"a {platform} tensor was passed, but JAX has no {platform} backend ({e}). "
                "For CUDA tensors install a CUDA build of JAX: pip install 'gateloop-hybrid[cuda]'"
            ) from None
        self.jax_device = jax_gpu_for(dl_id, backend.local_devices()) if self.cuda else \
            backend.device_from_local_hardware_id(dl_id)
        self.jax_stream = None
        if self.cuda:
            self.jax_stream = self.jax_device.get_stream_for_external_ready_events()
            self._jax_stream_in_torch = torch.cuda.ExternalStream(self.jax_stream, device=f"cuda:{dl_id}")
            self._event = torch.cuda.Event()
            self._torch_stream, self._torch_raw = None, None

    def torch_to_jax_order(self):
        """JAX's stream for external buffers waits for the work queued so far on torch's current
        stream of this device."""
        raw = torch._C._cuda_getCurrentRawStream(self.dl_id)
        if raw != self._torch_raw:     # a torch.cuda.Stream object costs ~5 us to make: reuse it
            self._torch_stream, self._torch_raw = torch.cuda.current_stream(self.dl_id), raw
        # cudaStreamWaitEvent captures the event as recorded now, so reusing one event is safe.
        self._event.record(self._torch_stream)
        self._jax_stream_in_torch.wait_event(self._event)


def _find_fast_paths():
    from ._jax_private import dlpack_raw
    return dlpack_raw() or False


_to_dlpack = getattr(torch._C, "_to_dlpack", torch.utils.dlpack.to_dlpack)
_from_dlpack = getattr(torch._C, "_from_dlpack", torch.utils.dlpack.from_dlpack)
exchange = _Exchange()


def to_jax(tensor: torch.Tensor, *, name: str = "tensor") -> jax.Array:
    """A jax.Array sharing ``tensor``'s memory (a copy only where the layout requires one, see
    ``prepare``). 64-bit dtypes stay 64-bit. Do not write to the tensor while JAX may still read it.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    check_layout(tensor, name)
    check_dtype(tensor, name)
    check_device(tensor, name)
    return exchange.to_jax([prepare(tensor)])[0]


def to_torch(array: jax.Array) -> torch.Tensor:
    """A torch tensor sharing ``array``'s memory, on the array's device, ordered after the JAX work
    that produces it (torch passes its current stream through DLPack)."""
    if not isinstance(array, jax.Array):
        raise TypeError(f"expected a jax.Array, got {type(array).__name__}")
    return exchange.to_torch([array])[0]
