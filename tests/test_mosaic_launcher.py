"""bridge.MosaicKernel: a Mosaic GPU kernel launched on torch tensors.

On CPU: values through the interpret-mode kernel, the per-key cache and its bound, argument
checks, torch.compile (cold), the custom op, the lowering step (module extraction and its
refusals) and the launch bookkeeping with the compile step faked. On a GPU (Hopper or newer):
values against interpret mode, side streams and CUDA graph capture.
"""

import functools

import pytest
import torch

pytest.importorskip("absl", reason="Pallas Mosaic GPU needs absl-py (pip install absl-py)")

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from bridge import MosaicKernel, mosaic, _mosaic_abi

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability()[0] >= 9),
                               reason="needs a Hopper (sm_90) or newer GPU")


def _axpy_call(x, *, a, interpret):
    """o = a * x + 1 over (B, T, D), one CTA per batch row; plain GMEM reads/writes."""
    B, T, D = x.shape

    @plgpu.kernel(out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(B,), grid_names=("b",),
                  interpret=InterpretGPUParams() if interpret else None)
    def kernel(x_ref, o_ref):
        b = jax.lax.axis_index("b")

        @pl.loop(0, T)
        def _(t):
            o_ref[b, t, :] = x_ref[b, t, :] * jnp.asarray(a, x.dtype) + jnp.asarray(1, x.dtype)

    return kernel(x)


def _two_out_call(x, y, *, interpret):
    """(x + y, x - y): two outputs, returned in swapped order to test the result mapping."""
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)

    @plgpu.kernel(out_type=(shape, shape), grid=(x.shape[0],), grid_names=("b",),
                  interpret=InterpretGPUParams() if interpret else None)
    def kernel(x_ref, y_ref, s_ref, d_ref):
        b = jax.lax.axis_index("b")
        s_ref[b, :] = x_ref[b, :] + y_ref[b, :]
        d_ref[b, :] = x_ref[b, :] - y_ref[b, :]

    s, d = kernel(x, y)
    return d, s


def axpy_fn(x, *, a=2.0):
    return _axpy_call(x, a=a, interpret=False)


def axpy_interpret(x, *, a=2.0):
    return _axpy_call(x, a=a, interpret=True)


def two_out_fn(x, y):
    return _two_out_call(x, y, interpret=False)


def two_out_interpret(x, y):
    return _two_out_call(x, y, interpret=True)


def make_axpy(name="axpy"):
    return MosaicKernel(axpy_fn, name=name, interpret_fn=axpy_interpret)


def x_of(shape=(2, 3, 128), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


# --------------------------------------------------------------------------------------------
# Values and cache on CPU (interpret mode)


def test_values_cpu():
    k = make_axpy()
    x = x_of()
    (o,) = k(x, a=3.0)
    torch.testing.assert_close(o, 3.0 * x + 1)
    assert isinstance(k(x), tuple)


def test_two_outputs_cpu():
    k = MosaicKernel(two_out_fn, name="two_out", interpret_fn=two_out_interpret)
    x, y = x_of((2, 128)), x_of((2, 128), seed=1)
    d, s = k(x, y)
    torch.testing.assert_close(d, x - y)
    torch.testing.assert_close(s, x + y)
    assert [tuple(a.shape) for a in k.out_structs(x, y)] == [(2, 128), (2, 128)]


def test_cache_keys():
    k = make_axpy()
    x = x_of()
    k(x)
    k(x_of(seed=1))
    assert k.cache_info() == (1, 1)             # same shape/dtype/static: nothing new
    k(x, a=3.0)
    k(x.to(torch.bfloat16))
    k(x_of((1, 2, 128)))
    assert k.cache_info() == (4, 4)
    k(x, a=3.0)
    assert k.cache_info() == (4, 4)
    k(x, a=3)                                   # 3 == 3.0 but a different static type
    assert k.cache_info().compiles == 5


def test_cache_bounded():
    k = make_axpy()
    k.max_entries = 2
    x = x_of()
    for a in (1.0, 2.0, 3.0):
        k(x, a=a)
    assert k.cache_info() == (2, 3)
    k(x, a=3.0)                                 # still held
    assert k.cache_info() == (2, 3)
    (o,) = k(x, a=1.0)                          # evicted, built again
    assert k.cache_info() == (2, 4)
    torch.testing.assert_close(o, x + 1)


def test_out_structs():
    k = make_axpy()
    x = x_of(dtype=torch.bfloat16)
    (s,) = k.out_structs(x, a=2.0)
    assert s.shape == (2, 3, 128) and s.dtype == jnp.bfloat16
    assert k.out_structs(x, a=2.0) is k.out_structs(x, a=2.0)


# --------------------------------------------------------------------------------------------
# Argument checks: one clear error each


def test_static_unhashable():
    k = make_axpy()
    with pytest.raises(TypeError, match="static argument 'a' has unhashable type list"):
        k(x_of(), a=[2.0])


@pytest.mark.parametrize("case, exc, match", [
    ("dtype", TypeError, r"argument 0 has dtype torch.float64"),
    ("non_contiguous", ValueError, r"argument 0 is not contiguous.*\.contiguous\(\)"),
    ("sparse", ValueError, r"argument 0 is a torch.sparse_coo tensor"),
    ("not_tensor", TypeError, r"argument 0 is a ndarray, expected a torch.Tensor"),
    ("no_tensors", ValueError, r"at least one tensor"),
    ("too_many", TypeError, r"called with 2 tensors"),
    ("meta", ValueError, r"argument 0 is on device meta"),
])
def test_bad_inputs(case, exc, match):
    k = make_axpy()
    x = x_of()
    k(x)   # a cached entry must not let a bad argument through
    args = {
        "dtype": (x.double(),),
        "non_contiguous": (x.transpose(0, 1),),
        "sparse": (x.to_sparse(),),
        "not_tensor": (x.numpy(),),
        "no_tensors": (),
        "too_many": (x, x),
        "meta": (x.to("meta"),),
    }[case]
    with pytest.raises(exc, match=match):
        k(*args)


def test_bad_cpu_without_interpret():
    k = MosaicKernel(axpy_fn, name="axpy")
    with pytest.raises(ValueError, match="argument 0 is on the CPU.*interpret_fn"):
        k(x_of())


def test_mixed_devices(monkeypatch):
    # Two devices on a CPU-only machine: treat meta as launchable so only the device mix is wrong.
    monkeypatch.setattr(mosaic, "_LAUNCH_DEVICES", ("cuda", "meta"))
    k = MosaicKernel(two_out_fn, name="two", interpret_fn=two_out_interpret)
    with pytest.raises(ValueError, match=r"one device, got argument 0 on cpu, argument 1 on meta"):
        k(x_of((2, 128)), x_of((2, 128)).to("meta"))


def test_requires_grad_not_tracked():
    k = make_axpy()
    x = x_of().requires_grad_()
    (o,) = k(x)
    assert not o.requires_grad
    torch.testing.assert_close(o, 2 * x.detach() + 1)


# --------------------------------------------------------------------------------------------
# torch.compile and the custom op


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_cold(backend):
    k = make_axpy(f"axpy_cold_{backend}")      # never called eagerly before compiling

    def f(x):
        (o,) = k(x * 2, a=3.0)
        return o - 1

    torch._dynamo.reset()
    x = x_of()
    got = torch.compile(f, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(got, 3.0 * (2 * x) + 1 - 1)
    torch.testing.assert_close(got, f(x))


def test_compile_one_op_in_graph():
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def fw(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    k = make_axpy("axpy_graph")
    torch._dynamo.reset()
    f = torch.compile(lambda x: k(x * 2, a=3.0)[0] - 1, fullgraph=True, backend=aot_autograd(fw_compiler=fw))
    x = x_of()
    torch.testing.assert_close(f(x), 6 * x)
    launches = [n for n in graphs[0].graph.nodes if n.target is torch.ops.bridge_mosaic.launch.default]
    assert len(launches) == 1


def test_compile_new_shapes_and_grad_inputs():
    k = make_axpy("axpy_shapes")
    torch._dynamo.reset()
    f = torch.compile(lambda x: k(x, a=3.0)[0] - 1, fullgraph=True, backend="aot_eager")
    for b in (2, 3, 4):                         # the third call is traced with a dynamic batch
        x = x_of((b, 3, 128))
        torch.testing.assert_close(f(x), 3 * x)
    o = f(x_of().requires_grad_())              # not differentiable, not tracked: as in eager mode
    assert not o.requires_grad


def _tagged_fn(x, *, a, tag):
    assert tag[1:] == (None, "s")
    return _axpy_call(x, a=a, interpret=False)


def _tagged_interpret(x, *, a, tag):
    return _axpy_call(x, a=a, interpret=True)


def test_compile_static_arguments():
    """Static values that arrive as arguments: Dynamo makes ints and floats symbolic after a
    recompile, but each value must select its own compiled kernel."""
    k = MosaicKernel(_tagged_fn, name="axpy_tagged", interpret_fn=_tagged_interpret)
    torch._dynamo.reset()
    f = torch.compile(lambda x, a, n: k(x, a=a, tag=(n, None, "s"))[0], fullgraph=True, backend="aot_eager")
    x = x_of()
    for a, n in ((2.0, 1), (3.0, 2), (0.5, 3), (3.0, 2), (4, 2)):
        torch.testing.assert_close(f(x, a, n), a * x + 1)
    assert k.cache_info().compiles == 4


def test_compile_static_arguments_from_dynamic_shapes():
    """A static value computed from a dynamic shape (a SymInt) in code that Dynamo leaves to
    AOTAutograd (nonstrict_trace, as gate_loop_scan's call) is specialized like an int: one kernel
    per value, a guard on it."""
    k = MosaicKernel(_tagged_fn, name="axpy_tagged_shape", interpret_fn=_tagged_interpret)
    call = torch._dynamo.nonstrict_trace(lambda x: k(x, a=2.0, tag=(x.shape[0], None, "s"))[0])
    torch._dynamo.reset()
    f = torch.compile(call, fullgraph=True, backend="aot_eager", dynamic=True)
    for b in (2, 3, 2):
        x = x_of((b, 3, 128))
        torch.testing.assert_close(f(x), 2.0 * x + 1)
    assert k.cache_info().compiles == 2


_axpy_for_grad = {}


class _Axpy(torch.autograd.Function):
    """How callers add gradients: d(a x + 1)/dx = a, the backward being the same kernel."""

    @staticmethod
    def forward(ctx, x, a):
        ctx.a = a
        return _axpy_for_grad["k"](x, a=a)[0]

    @staticmethod
    def backward(ctx, g):
        return _axpy_for_grad["k"](g.contiguous(), a=ctx.a)[0] - 1, None


@pytest.mark.parametrize("compiled", [False, True])
def test_in_autograd_function(compiled):
    _axpy_for_grad["k"] = make_axpy(f"axpy_autograd_{compiled}")
    f = lambda x: _Axpy.apply(x, 3.0).sum()
    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = x_of().requires_grad_()
    (g,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g, torch.full_like(x, 3.0))


def test_compile_two_outputs():
    k = MosaicKernel(two_out_fn, name="two_out_compiled", interpret_fn=two_out_interpret)
    torch._dynamo.reset()
    f = torch.compile(lambda x, y: k(x, y)[0] * k(x, y)[1], fullgraph=True, backend="aot_eager")
    x, y = x_of((2, 128)), x_of((2, 128), seed=1)
    torch.testing.assert_close(f(x, y), (x - y) * (x + y))


def test_opcheck():
    k = make_axpy("axpy_opcheck")
    key = k._op_key({"a": 3.0})
    torch.library.opcheck(mosaic._launch_op, (key, [x_of()]))


# --------------------------------------------------------------------------------------------
# Lowering (CPU: lowered for CUDA, never run)


def test_lower_extracts_one_module():
    s = jax.ShapeDtypeStruct((2, 3, 128), jnp.float32)
    m = _mosaic_abi.lower(functools.partial(axpy_fn, a=2.0), [s], "axpy")
    assert m.module_bytes.startswith(b"ML\xefR")        # MLIR bytecode
    assert m.n_inputs == 1 and m.results == (((2, 3, 128), "float32"),) and m.returned == (0,)


def test_lower_maps_returned_results():
    s = jax.ShapeDtypeStruct((2, 128), jnp.bfloat16)
    m = _mosaic_abi.lower(two_out_fn, [s, s], "two_out")
    assert m.n_inputs == 2 and m.results == (((2, 128), "bfloat16"),) * 2 and m.returned == (1, 0)


@pytest.mark.parametrize("fn, match", [
    (lambda x: axpy_fn(axpy_fn(x)), "calls 2 Mosaic GPU kernels"),
    (lambda x: axpy_fn(x) * 2, "work outside its kernel"),
    (lambda x: axpy_fn(x * 2), "work outside its kernel"),
    (lambda x: (axpy_fn(x), x), "output 1 is not a result of the kernel"),
    (lambda x: x + 1, "no Mosaic GPU kernel"),
    (lambda x, y: axpy_fn(x), "every input must go to the kernel"),
    (lambda x, y: two_out_fn(y, x), "operands must be the function's inputs"),
])
def test_lower_refuses(fn, match):
    s = jax.ShapeDtypeStruct((2, 3, 128), jnp.float32)
    n = fn.__code__.co_argcount
    with pytest.raises(ValueError, match=match):
        _mosaic_abi.lower(fn, [s] * n, "f")


_CALL = """
module {
  func.func public @main(%arg0: tensor<4x2xf32>) -> tensor<4x2xf32> {
    %0 = stablehlo.custom_call @mosaic_gpu_v2(%arg0) {mhlo.backend_config = {module = "ML", CONFIG}ATTRS}
        : (tensor<4x2xf32>) -> tensor<4x2xf32>
    return %0 : tensor<4x2xf32>
  }
}
"""


@pytest.mark.parametrize("config, attrs, match", [
    ("use_custom_barrier = false", "", None),
    ("use_custom_barrier = true", "", "multi-device/collective kernel"),
    ("uses_xla_collective_metadata = true", "", "multi-device/collective kernel"),
    ("use_custom_barrier = false", ", output_operand_aliases = [#stablehlo.output_operand_alias<"
     "output_tuple_indices = [], operand_index = 0, operand_tuple_indices = []>]", "aliases outputs to inputs"),
    ("use_custom_barrier = false", ", operand_layouts = [dense<[0, 1]> : tensor<2xindex>], result_layouts = [dense<[1, 0]> : tensor<2xindex>]",
     "non row-major"),
])
def test_find_call_refuses(config, attrs, match):
    """Call forms that plain kernels do not lower to, written out as StableHLO."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    with mlir.make_ir_context():
        module = ir.Module.parse(_CALL.replace("CONFIG", config).replace("ATTRS", attrs))
        if match is None:
            assert _mosaic_abi._find_call(module, 1, "f").module_bytes == b"ML"
        else:
            with pytest.raises(ValueError, match=match):
                _mosaic_abi._find_call(module, 1, "f")


def test_library_names_what_is_missing(monkeypatch):
    _mosaic_abi.library.cache_clear()
    monkeypatch.setattr(_mosaic_abi, "_jaxlib_version", lambda: "0.11.0")
    with pytest.raises(_mosaic_abi.MosaicGpuUnavailable, match=r"jaxlib >= 0.11.1.*found jaxlib 0.11.0"):
        _mosaic_abi.library()
    if not CUDA:
        monkeypatch.setattr(_mosaic_abi, "_jaxlib_version", lambda: "0.11.2")
        monkeypatch.setattr(_mosaic_abi, "_PLUGINS", ("no_such_plugin",))
        with pytest.raises(_mosaic_abi.MosaicGpuUnavailable, match="no JAX CUDA plugin"):
            _mosaic_abi.library()

    class NoSymbols:
        pass
    with pytest.raises(_mosaic_abi.MosaicGpuUnavailable, match="lacks a Mosaic GPU entry point"):
        _mosaic_abi._Library(NoSymbols(), "libfake.so")
    _mosaic_abi.library.cache_clear()


# --------------------------------------------------------------------------------------------
# Launch bookkeeping with the compile step faked (CPU tensors standing in for device memory)


class FakeCompiled:
    def __init__(self, module_bytes, device_index, log):
        self.module_bytes, self.device_index, self.log = module_bytes, device_index, log
        self.function = 0xF00
        self.unloaded = False

    def launch(self, function, stream, buffers):
        self.log.append((function, stream, [buffers[i] for i in range(len(buffers))]))

    def unload(self):
        self.unloaded = True


@pytest.fixture
def fake_launch(monkeypatch):
    compiled = []
    log = []

    def fake_compile(module_bytes, device_index):
        compiled.append(FakeCompiled(module_bytes, device_index, log))
        return compiled[-1]

    monkeypatch.setattr(_mosaic_abi, "compile", fake_compile)
    monkeypatch.setattr(mosaic, "_LAUNCH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(mosaic, "_raw_stream", lambda index: 0x5EA + (index or 0))
    monkeypatch.setattr(mosaic, "_current_device", lambda: None)
    monkeypatch.setattr(mosaic, "_is_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return compiled, log


def test_launch_bookkeeping(fake_launch):
    compiled, log = fake_launch
    k = MosaicKernel(two_out_fn, name="two_out")
    x, y = x_of((2, 128), dtype=torch.bfloat16), x_of((2, 128), dtype=torch.bfloat16, seed=1)
    d, s = k(x, y)
    assert len(compiled) == 1 and compiled[0].module_bytes.startswith(b"ML\xefR")
    [(function, stream, pointers)] = log
    assert function == 0xF00 and stream == 0x5EA
    # inputs in operand order, then outputs in the kernel's result order (s, d): returned as (d, s)
    assert pointers == [x.data_ptr(), y.data_ptr(), s.data_ptr(), d.data_ptr()]
    for o in (d, s):
        assert o.shape == (2, 128) and o.dtype == torch.bfloat16 and o.device == x.device
    k(y, x)
    assert len(compiled) == 1 and log[1][2][:2] == [y.data_ptr(), x.data_ptr()]
    assert k.cache_info() == (1, 1)


def test_launch_on_the_tensors_gpu_whatever_torchs_current_device(fake_launch, monkeypatch):
    """A kernel for tensors on cuda:1 is compiled into cuda:1's context and launched there, on
    cuda:1's current stream, also while torch's current device is cuda:0 (a torchrun rank that
    never called set_device), and without a device switch when cuda:1 is current."""
    import contextlib
    compiled, log = fake_launch
    current = [0]
    switches = []

    @contextlib.contextmanager
    def device(index):
        before, current[0] = current[0], index
        switches.append(index)
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(mosaic, "_current_device", lambda: current[0])
    monkeypatch.setattr(mosaic, "_raw_stream", lambda index: (0x5EA + index, current[0]))
    module = _mosaic_abi.KernelModule(module_bytes=b"ML", n_inputs=1, results=(), returned=())
    entry = mosaic._Launch("k", module, torch.device("cuda", 1))
    assert compiled[0].device_index == 1

    class OnGpu1:
        def data_ptr(self):
            return 0x1000

    entry([OnGpu1()])
    assert log[-1][1] == (0x5EA + 1, 1) and switches == [1] and current == [0]
    current[0] = 1
    entry([OnGpu1()])
    assert log[-1][1] == (0x5EA + 1, 1) and switches == [1]


def chained_fn(x):
    """Four CTAs, each waiting for its predecessor through a grid-wide semaphore."""
    def body(x_ref, o_ref):
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((4,)))
        i = jax.lax.axis_index("x")

        @pl.when(i > 0)
        def _():
            plgpu.semaphore_wait(sems.at[i - 1], 1, memory_scope="gpu")
        o_ref[pl.ds(i * 128, 128)] = x_ref[pl.ds(i * 128, 128)] + 1.0
        plgpu.semaphore_signal(sems.at[i], 1, memory_scope="gpu")
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((512,), jnp.float32), grid=(4,),
                        grid_names=("x",))(x)


def test_lower_finds_grid_wide_semaphores():
    m = _mosaic_abi.lower(chained_fn, [jax.ShapeDtypeStruct((512,), jnp.float32)], "chained")
    assert m.n_inputs == 1 and m.results == (((512,), "float32"), ((4,), "int32"))
    assert m.returned == (0,) and m.zeroed == (1,)


def test_launch_passes_zeroed_semaphores_as_operand_and_result(fake_launch):
    compiled, log = fake_launch
    k = MosaicKernel(chained_fn, name="chained")
    x = x_of((512,))
    (out,) = k(x)
    (_, _, pointers), = log
    assert out.shape == (512,) and len(pointers) == 4
    assert pointers[0] == x.data_ptr() and pointers[1] == pointers[3] and pointers[2] == out.data_ptr()
    assert pointers[1] not in (x.data_ptr(), out.data_ptr())
    assert next(iter(k._entries.values())).zeroed == (1,)


def test_launch_eviction_unloads(fake_launch):
    compiled, _ = fake_launch
    k = MosaicKernel(axpy_fn, name="axpy")
    k.max_entries = 1
    x = x_of()
    k(x, a=1.0)
    k(x, a=2.0)
    assert [c.unloaded for c in compiled] == [True, False]
    k.cache_clear()
    assert compiled[1].unloaded and k.cache_info().entries == 0


def test_launch_refuses_misaligned(fake_launch):
    k = MosaicKernel(axpy_fn, name="axpy")
    x = x_of((1, 1, 129)).view(-1)[1:].view(1, 1, 128)        # contiguous, offset by 4 bytes
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        k(x)


# --------------------------------------------------------------------------------------------
# GPU (Hopper or newer)


@needs_gpu
def test_gpu_grid_wide_semaphores_chain_the_ctas_on_every_launch():
    """The semaphores start at zero on every launch (a stale count would let a CTA run early)."""
    k = MosaicKernel(chained_fn, name="chained")
    x = x_of((512,)).cuda()
    for _ in range(3):
        (o,) = k(x)
        torch.testing.assert_close(o, x + 1)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_values(dtype):
    k = make_axpy()
    x = x_of(dtype=dtype)
    (o,) = k(x.cuda(), a=3.0)
    (ref,) = k(x, a=3.0)
    # bfloat16: the GPU may fuse the multiply-add where interpret mode rounds twice (one ulp)
    tol = dict(atol=8e-3, rtol=1.6e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(o.cpu(), ref, **tol)
    k2 = MosaicKernel(two_out_fn, name="two_out", interpret_fn=two_out_interpret)
    x, y = x_of((4, 256), dtype), x_of((4, 256), dtype, seed=1)
    for got, want in zip(k2(x.cuda(), y.cuda()), k2(x, y)):
        torch.testing.assert_close(got.cpu(), want, **tol)


@needs_gpu
def test_gpu_side_stream():
    """The launch goes to torch's current stream: queued behind a slow write on a side stream, it
    must read the written values (on any other stream it would read the zeros)."""
    k = make_axpy()
    x = torch.zeros(8, 64, 256, device="cuda")
    new = x_of((8, 64, 256), device="cuda")
    k(x, a=3.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)          # tens of milliseconds of GPU time on this stream
        x.copy_(new)
        (o,) = k(x, a=3.0)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(o, 3 * new + 1)


@needs_gpu
def test_gpu_graph_capture():
    k = make_axpy()
    x = x_of((8, 64, 256), device="cuda")
    (eager,) = k(x, a=3.0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        k(x, a=3.0)   # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        (captured,) = k(x, a=3.0)
    captured.zero_()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)
    x.copy_(x_of((8, 64, 256), seed=5, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, 3 * x + 1)


@needs_gpu
def test_gpu_eviction_and_misaligned():
    k = make_axpy()
    k.max_entries = 1
    x = x_of((8, 64, 256), device="cuda")
    for a in (1.0, 2.0, 1.0, 2.0):            # each call compiles, evicting (and unloading) the other
        (o,) = k(x, a=a)
        torch.testing.assert_close(o, a * x + 1)
    assert k.cache_info() == (1, 4)
    flat = torch.zeros(8 * 64 * 256 + 4, device="cuda")
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        k(flat[1:1 + x.numel()].view(x.shape), a=2.0)
    torch.testing.assert_close(k(flat[4:4 + x.numel()].view(x.shape), a=2.0)[0], torch.ones_like(x))


@pytest.mark.skipif(not (CUDA and torch.cuda.device_count() > 1
                         and torch.cuda.get_device_capability(1)[0] >= 9), reason="needs two Hopper GPUs")
def test_gpu_other_device():
    k = make_axpy()
    x = x_of((8, 64, 256))
    with torch.cuda.device(0):
        (o1,) = k(x.to("cuda:1"), a=3.0)      # compiled and launched in cuda:1's context
        (o0,) = k(x.to("cuda:0"), a=3.0)
    assert o1.device == torch.device("cuda:1")
    torch.testing.assert_close(o1.cpu(), o0.cpu())


@needs_gpu
def test_gpu_compile_reduce_overhead():
    k = make_axpy()
    torch._dynamo.reset()
    f = torch.compile(lambda x: k(x, a=3.0)[0] + 1, fullgraph=True, mode="reduce-overhead")
    x = x_of((8, 64, 256), device="cuda")
    for _ in range(3):
        got = f(x)
    torch.testing.assert_close(got, 3 * x + 2)
