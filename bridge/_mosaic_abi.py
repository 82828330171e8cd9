"""The private JAX/jaxlib pieces behind ``bridge.mosaic``, kept in one place because they move.

- ``lower``: a JAX function holding one ``plgpu.kernel`` call -> the serialized Mosaic GPU module
  (the ``module`` bytes in the ``mosaic_gpu_v2`` custom call's ``mhlo.backend_config``), plus the
  shapes/dtypes of the call's results and which of them the function returns. Runs on any machine:
  it lowers for CUDA without a GPU.
- ``compile``: the module -> a loaded CUDA function and its host-side launcher, through the CUDA
  plugin's ``MosaicGpuCompile`` (a C entry point that JAX's own ``as_torch_kernel`` uses). Its
  signature changed after jaxlib 0.11.0; this file speaks the jaxlib >= 0.11.1 form:

      void** MosaicGpuCompile(const char* module, int num_bytes)   -> {function, host_launch, kernel}
      void   host_launch(CUfunction function, CUstream stream, void** buffers)
      void   MosaicGpuUnload(void** compiled)

  ``buffers`` holds the device pointers of all inputs (custom-call operand order), then all outputs
  (custom-call result order). A failed launch aborts the process (the runtime does not return
  errors), so the caller checks everything it can before launching.

Anything that cannot work here raises ``MosaicGpuUnavailable`` naming what is missing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib
import importlib.metadata
import re

import jax

MIN_JAXLIB = (0, 11, 1)
_PLUGINS = ("cuda13", "cuda12")     # jax_plugins.xla_<name>, distribution jax-<name>-plugin

# MLIR element type -> numpy/torch dtype name.
_ELEMENT_TYPES = {
    "f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64",
    "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "ui8": "uint8", "i1": "bool",
    "f8E4M3FN": "float8_e4m3fn", "f8E5M2": "float8_e5m2",
}


class MosaicGpuUnavailable(RuntimeError):
    """Mosaic GPU kernels cannot be compiled here (no CUDA plugin, jaxlib too old, symbol missing)."""


@dataclasses.dataclass(frozen=True)
class KernelModule:
    """One lowered kernel: what ``compile`` needs and what a launch allocates."""
    module_bytes: bytes
    n_inputs: int
    results: tuple          # per custom-call result: (shape tuple, dtype name)
    returned: tuple         # the function's outputs, as indices into ``results``
    zeroed: tuple = ()      # results that are also operands after the inputs, zero at launch:
                            # the grid-wide semaphores of pl.get_global, as result indices


# --------------------------------------------------------------------------------------------
# Lowering (CPU-safe)


def lower(fn, in_structs, name: str) -> KernelModule:
    """Lower ``fn(*in_structs)`` for CUDA and extract its one Mosaic GPU call."""
    from jax._src.lib.mlir import passmanager
    try:
        import jax.experimental.mosaic.gpu as mgpu
    except ImportError as e:
        raise MosaicGpuUnavailable(f"Mosaic GPU's Python side does not import ({e}); it needs absl-py "
                                   "(pip install absl-py)") from e

    module = jax.jit(fn).trace(*in_structs).lower(lowering_platforms=("cuda",)).compiler_ir()
    with module.context:
        # jax.jit outlines nested jitted bodies into private functions: inline them into main.
        mgpu.dialect.register_inliner_extensions(module.context)
        passmanager.PassManager.parse("builtin.module(inline{default-pipeline=})").run(module.operation)
        return _find_call(module, len(in_structs), name)


def _find_call(module, n_inputs: int, name: str) -> KernelModule:
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import func

    mains = [op for op in module.body.operations if isinstance(op, func.FuncOp) and op.name.value == "main"]
    if len(mains) != 1:
        raise ValueError(f"{name}: the lowered module has {len(mains)} main functions, expected one")
    block = mains[0].body.blocks[0]
    calls, other, ret, zeros = [], [], None, {}
    for op in block.operations:
        kind = op.operation.name
        if kind == "stablehlo.custom_call" and op.call_target_name.value == "mosaic_gpu_v2":
            calls.append(op)
        elif kind == "func.return":
            ret = op
        elif kind == "stablehlo.custom_call":
            other.append(f"custom_call @{op.call_target_name.value}")
        elif kind == "stablehlo.constant" and _is_int32_zero(op.result.type, op.attributes["value"]):
            zeros[op.result] = op
        elif (kind == "stablehlo.broadcast_in_dim" and op.operands[0] in zeros
              and str(ir.RankedTensorType(op.result.type).element_type) == "i32"):
            zeros[op.result] = op   # zeros for the kernel's semaphores (checked below)
        else:
            other.append(kind)
    if not calls:
        raise ValueError(f"{name}: no Mosaic GPU kernel found; the function must call one plgpu.kernel")
    if len(calls) > 1:
        raise ValueError(f"{name}: the function calls {len(calls)} Mosaic GPU kernels; the launcher runs "
                         "exactly one kernel per function (wrap each in its own MosaicKernel)")
    if other:
        raise ValueError(f"{name}: the function does work outside its kernel ({', '.join(sorted(set(other)))}); "
                         "the launcher runs the kernel alone: move that work into the kernel or into torch")
    call = calls[0]
    args = list(block.arguments)
    if len(args) != n_inputs:
        raise ValueError(f"{name}: {n_inputs} tensors were passed but the lowered function takes {len(args)} "
                         "arrays (jax.jit drops unused inputs): every input must go to the kernel")
    operands = list(call.operands)
    if operands[:n_inputs] != args or any(v not in zeros for v in operands[n_inputs:]):
        raise ValueError(f"{name}: the kernel's operands must be the function's inputs, each once and in "
                         "order (no reordering, duplicates or computed operands)")
    # Operands after the inputs are zeros that the kernel updates in place (aliased to a result):
    # Pallas's grid-wide semaphores. The launcher passes a zeroed buffer as both.
    aliased = {}
    for alias in (call.output_operand_aliases or ()):
        text = str(alias)
        operand = int(re.search(r"operand_index = (\d+)", text).group(1))
        result = re.search(r"output_tuple_indices = \[(\d*)\]", text).group(1)
        if operand < n_inputs or not result:
            raise ValueError(f"{name}: the kernel aliases outputs to inputs (input_output_aliases), which the "
                             "launcher does not support: return fresh outputs")
        aliased[operand] = int(result)
    if sorted(aliased) != list(range(n_inputs, len(operands))):
        raise ValueError(f"{name}: the kernel takes {len(operands) - n_inputs} operands besides its inputs "
                         "that are not semaphores updated in place; the launcher passes the inputs only")
    zeroed = tuple(aliased[i] for i in range(n_inputs, len(operands)))
    if any(index in returned_values(ret, call) for index in zeroed):
        raise ValueError(f"{name}: the function returns the kernel's semaphores; return kernel outputs only")
    for attr_name in ("operand_layouts", "result_layouts"):
        if attr_name in call.attributes:
            for layout in call.attributes[attr_name]:
                dims = [int(d) for d in ir.DenseIntElementsAttr(layout)]
                if dims != sorted(dims, reverse=True):
                    raise ValueError(f"{name}: the kernel call has a non row-major layout {dims} in "
                                     f"{attr_name}; the launcher passes row-major tensors")
    results = []
    for i, r in enumerate(call.results):
        try:
            ty = ir.RankedTensorType(r.type)
        except ValueError:
            raise ValueError(f"{name}: kernel result {i} has type {r.type}, expected a ranked tensor") from None
        element = str(ty.element_type)
        if element not in _ELEMENT_TYPES:
            raise TypeError(f"{name}: kernel result {i} has element type {element}, which the launcher "
                            f"does not map to torch (supported: {', '.join(_ELEMENT_TYPES.values())})")
        results.append((tuple(ty.shape), _ELEMENT_TYPES[element]))
    kernel_results = list(call.results)
    returned = []
    for j, value in enumerate(ret.operands):
        index = next((i for i, r in enumerate(kernel_results) if r == value), None)
        if index is None:
            raise ValueError(f"{name}: output {j} is not a result of the kernel (an input passed through, "
                             "or a value computed outside the kernel); return kernel results only")
        returned.append(index)
    try:
        config = call.attributes["mhlo.backend_config"]
        module_bytes = config["module"].value_bytes
    except (KeyError, AttributeError, TypeError) as e:
        raise MosaicGpuUnavailable(f"{name}: the mosaic_gpu_v2 call carries no module bytes in its "
                                   f"mhlo.backend_config (jax {jax.__version__}): {e}") from None
    # Collective kernels get extra buffers and a barrier from XLA, which a plain launch lacks.
    collective = [k for k in ("use_custom_barrier", "uses_xla_collective_metadata", "xla_replica_ids")
                  if k in config and str(config[k]) not in ("false", '""')]
    if collective:
        raise ValueError(f"{name}: the kernel is a multi-device/collective kernel ({', '.join(collective)}); "
                         "the launcher runs single-device kernels only")
    if not module_bytes:
        raise ValueError(f"{name}: the mosaic_gpu_v2 call has an empty module")
    return KernelModule(bytes(module_bytes), n_inputs, tuple(results), tuple(returned), zeroed)


def returned_values(ret, call) -> set:
    """Indices of the kernel results that the function returns."""
    results = list(call.results)
    return {results.index(v) for v in ret.operands if v in results}


def _is_int32_zero(ty, value) -> bool:
    from jax._src.lib.mlir import ir
    try:
        tensor = ir.RankedTensorType(ty)
        return (str(tensor.element_type) == "i32" and ir.DenseElementsAttr(value).is_splat
                and int(ir.DenseIntElementsAttr(value)[0]) == 0)
    except (ValueError, TypeError, IndexError):
        return False


# --------------------------------------------------------------------------------------------
# Compiling and launching (CUDA plugin, jaxlib >= 0.11.1)


_LAUNCH_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p))


def _version(text: str) -> tuple:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def _jaxlib_version() -> str:
    import jaxlib.version
    return jaxlib.version.__version__


def _need(what: str, version: str) -> None:
    if _version(version) < MIN_JAXLIB:
        raise MosaicGpuUnavailable(
            f"launching Mosaic GPU kernels from torch needs {what} >= {'.'.join(map(str, MIN_JAXLIB))} "
            f"(MosaicGpuCompile's calling convention changed after 0.11.0); found {what} {version}. "
            "Upgrade: pip install -U 'jax[cuda13]'")


class _Library:
    def __init__(self, dll, path: str):
        self.path = path
        try:
            self.compile = dll.MosaicGpuCompile
            self.unload = dll.MosaicGpuUnload
        except AttributeError as e:
            raise MosaicGpuUnavailable(f"the JAX CUDA plugin library {path} lacks a Mosaic GPU entry point "
                                       f"({e}); reinstall jax[cuda13] >= 0.11.1") from None
        self.compile.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.compile.restype = ctypes.POINTER(ctypes.c_void_p)
        self.unload.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self.unload.restype = None


@functools.cache
def library() -> _Library:
    """The CUDA plugin's Mosaic GPU entry points, after the version checks (cached once found)."""
    _need("jaxlib", _jaxlib_version())
    for plugin in _PLUGINS:
        try:
            module = importlib.import_module(f"jax_plugins.xla_{plugin}")
        except ImportError:
            continue
        try:
            _need(f"jax-{plugin}-plugin", importlib.metadata.version(f"jax-{plugin}-plugin"))
        except importlib.metadata.PackageNotFoundError:
            pass    # a plugin built from source: its version is jaxlib's, checked above
        path = module._get_library_path()
        return _Library(ctypes.CDLL(path), str(path))
    raise MosaicGpuUnavailable("no JAX CUDA plugin is installed (jax_plugins.xla_cuda13 or xla_cuda12), and "
                               "Mosaic GPU kernels are compiled by it: pip install 'jax[cuda13]'")


class Compiled:
    """A module loaded into one device's CUDA context: ``launch(function, stream, buffers)``."""
    __slots__ = ("function", "launch", "_handle", "_unload")

    def __init__(self, handle, unload):
        self._handle, self._unload = handle, unload
        self.function = handle[0]
        self.launch = _LAUNCH_TYPE(handle[1])

    def unload(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._unload(handle)


def compile(module_bytes: bytes, device_index: int) -> Compiled:
    """Compile and load ``module_bytes`` into the CUDA context of device ``device_index``."""
    import torch
    lib = library()
    torch.cuda.init()
    with torch.cuda.device(device_index):
        handle = lib.compile(module_bytes, len(module_bytes))
    if not handle:
        major, minor = torch.cuda.get_device_capability(device_index)
        hint = (f"; Mosaic GPU needs a Hopper (sm_90) or newer GPU and cuda:{device_index} is sm_{major}{minor}"
                if major < 9 else "")
        raise RuntimeError(f"MosaicGpuCompile failed on cuda:{device_index}{hint} (jaxlib "
                           f"{_jaxlib_version()}, plugin {lib.path})")
    return Compiled(handle, lib.unload)


def interpret_params():
    """Pallas's Mosaic GPU interpret mode (``plgpu.kernel(..., interpret=interpret_params())``):
    the kernel run by JAX on the CPU, for ``MosaicKernel``'s ``interpret_fn``. Not public in JAX."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()
