"""bridge: zero-copy exchange, autograd (real and complex), caching, dtypes, errors, torch.compile."""

import os
import warnings
import subprocess
import sys

import numpy as np
import pytest
import torch

from bridge import jax2torch, to_jax, to_torch
import jax.numpy as jnp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ptr(array) -> int:
    return array.unsafe_buffer_pointer()


# ---- 2. zero copy ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.complex64,
                                   torch.float64, torch.complex128, torch.int64, torch.int32,
                                   torch.uint8, torch.bool])
def test_zero_copy_both_ways(device, dtype):
    t = (torch.randn(5, 7, device=device) * 10).to(dtype)
    j = to_jax(t)
    assert _ptr(j) == t.data_ptr()
    assert str(j.dtype) == str(dtype).removeprefix("torch.")   # never narrowed
    back = to_torch(j)
    assert back.data_ptr() == t.data_ptr() and back.dtype == dtype
    assert torch.equal(back, t)


def test_to_jax_handles_grad_views_and_bits():
    base = torch.randn(6, 8, requires_grad=True)
    j = to_jax(base)                                   # requires grad: detached, same memory
    assert _ptr(j) == base.data_ptr()
    tr = base.detach().t()                             # non-contiguous: one copy, right values
    assert (jnp.asarray(to_jax(tr)) == jnp.asarray(tr.numpy())).all()
    z = torch.randn(4, 3, dtype=torch.complex64)
    assert jnp.allclose(to_jax(z.conj()), jnp.conj(to_jax(z)))          # conj bit resolved
    assert jnp.allclose(to_jax(torch.neg(z.conj()).conj()), -to_jax(z))  # neg bit resolved
    g = torch.ones(1, 1).expand(4, 5)                  # stride 0 (as autograd's sum() grads are)
    assert to_jax(g).shape == (4, 5) and float(to_jax(g).sum()) == 20


def test_to_jax_and_to_torch_reject_bad_types():
    with pytest.raises(TypeError, match="torch.Tensor"):
        to_jax([1.0, 2.0])
    with pytest.raises(TypeError, match="jax.Array"):
        to_torch(torch.ones(2))
    with pytest.raises(TypeError, match="complex32"):
        to_jax(torch.ones(2, dtype=torch.complex32), name="z")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        to_jax(torch.ones(2).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="meta"):
        to_jax(torch.ones(2, device="meta"))


# ---- 1. pytrees, kwargs, statics, integer tensors --------------------------------------------


def test_pytrees_kwargs_statics_and_int_tensors():
    def fn(inputs, scale, *, power, idx):
        x, y = inputs["x"], inputs["y"]
        return {"out": (x * scale) ** power + y.sum(), "picked": x[idx], "count": idx * 2}

    f = jax2torch(fn)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 2, 4])
    out = f({"x": x, "y": y}, 3.0, power=2, idx=idx)
    assert set(out) == {"out", "picked", "count"}
    assert out["count"].dtype == torch.int64 and not out["count"].requires_grad
    assert torch.equal(out["count"], idx * 2)
    (out["out"].sum() + out["picked"].sum()).backward()
    xr, yr = x.detach().requires_grad_(), y.detach().requires_grad_()
    ref = ((xr * 3.0) ** 2 + yr.sum()).sum() + xr[idx].sum()
    gx, gy = torch.autograd.grad(ref, (xr, yr))
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(y.grad, gy)
    assert idx.grad is None


def test_static_arguments_select_compiled_functions_and_must_be_hashable():
    f = jax2torch(lambda x, n: x * n)
    x = torch.randn(3)
    torch.testing.assert_close(f(x, 2), x * 2)
    torch.testing.assert_close(f(x, 3), x * 3)
    i = torch.arange(4, dtype=torch.int32)
    assert f(i, 2).dtype == torch.int32 and f(i, 2.0).dtype == torch.float32   # 2 == 2.0 as keys
    with pytest.raises(TypeError, match="not hashable"):
        f(x, np.ones(2))


# ---- 3. caching and no closure on the context --------------------------------------------------


def test_no_retrace_after_warm_up():
    f = jax2torch(lambda a, b: jnp.sin(a) * b)
    a = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    for _ in range(2):
        f(a, b).sum().backward()
        f(a.detach(), b.detach())
    warm = f.trace_count
    for _ in range(5):
        f(a, b).sum().backward()
        with torch.no_grad():
            f(a, b)
    assert f.trace_count == warm
    f(torch.randn(2, 5), torch.randn(2, 5))      # a new shape traces once more
    assert f.trace_count > warm


def test_in_place_change_after_forward_is_caught_like_torch():
    f = jax2torch(lambda x: x * x)
    x = torch.randn(3, requires_grad=True)
    leaf = x.clone()
    y = f(leaf)
    with torch.no_grad():
        leaf.mul_(10.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    ref = leaf.detach().clone().requires_grad_()     # and plain torch does the same
    y = ref * ref
    with torch.no_grad():
        ref.mul_(10.0)
    with pytest.raises(RuntimeError):
        y.sum().backward()


def test_output_used_as_residual_is_version_checked():
    f = jax2torch(jnp.exp)                # exp saves its output as the residual
    x = torch.randn(4, requires_grad=True)
    y = f(x)
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- 4. complex gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("kind", ["holomorphic", "non_holomorphic"])
def test_complex_gradients_match_torch(dtype, kind):
    if kind == "holomorphic":
        jfn, tfn = (lambda z, w: jnp.exp(z) * w + z ** 2), (lambda z, w: torch.exp(z) * w + z ** 2)
    else:
        jfn = lambda z, w: jnp.abs(z) ** 2 * w + jnp.conj(z) * jnp.real(w)
        tfn = lambda z, w: torch.abs(z) ** 2 * w + torch.conj(z) * torch.real(w)
    f = jax2torch(jfn)
    z = torch.randn(6, dtype=dtype, requires_grad=True)
    w = torch.randn(6, dtype=dtype, requires_grad=True)
    cot = torch.randn(6, dtype=dtype)
    out = f(z, w)
    gz, gw = torch.autograd.grad(out, (z, w), cot)
    ref = tfn(z, w)
    rz, rw = torch.autograd.grad(ref, (z, w), cot)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.complex64 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gz, rz, **tol)
    torch.testing.assert_close(gw, rw, **tol)


def test_real_input_complex_output_gradient():
    f = jax2torch(lambda x: jnp.exp(1j * x))
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(5, dtype=torch.complex128)
    (g,) = torch.autograd.grad(f(x), x, cot)
    xr = x.detach().requires_grad_()
    (r,) = torch.autograd.grad(torch.exp(1j * xr), xr, cot)
    torch.testing.assert_close(g, r)


# ---- 5. dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.complex64,
                                   torch.float64, torch.complex128, torch.int64])
def test_identity_round_trip_is_exact(dtype):
    f = jax2torch(lambda x: x + 0)
    t = (torch.randn(17) * 1e3).to(dtype) if dtype != torch.int64 else torch.tensor([2**40 + 1, -3])
    out = f(t)
    assert out.dtype == dtype
    assert torch.equal(out, t)


def test_gradcheck_float64():
    f = jax2torch(lambda x, y: (jnp.tanh(x) * y, jnp.sum(x * x)))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, y))


# ---- 6. devices and errors -------------------------------------------------------------------------


def test_bad_arguments_name_themselves():
    f = jax2torch(lambda x, y: x + y, name="add")
    with pytest.raises(TypeError, match=r"add: argument args\[1\].*complex32"):
        f(torch.ones(2), torch.ones(2, dtype=torch.complex32))
    with pytest.raises(ValueError, match=r"kwargs\['y'\].*meta"):
        f(torch.ones(2), y=torch.ones(2, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_outputs_on_input_device_and_mixed_devices_refused():
    f = jax2torch(lambda x, y: x * y, name="mul")
    last = torch.cuda.device_count() - 1
    x = torch.randn(8, device=f"cuda:{last}")
    out = f(x, x)
    assert out.device == x.device
    torch.testing.assert_close(out, x * x)
    with pytest.raises(ValueError, match="one device"):
        f(x, x.cpu())


# ---- 7. JAX's process-wide settings: GPU memory, CPU dispatch ---------------------------------


# Each case needs a fresh interpreter (the settings are per process): one subprocess per case.
FRESH_PROCESS_REPORT = ("import os\n"
                        "from jax._src import xla_bridge\n"
                        "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'], xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)\n")
JAX_ENV = ("XLA_PYTHON_CLIENT_PREALLOCATE", "GATELOOP_HYBRID_JAX_CPU_ASYNC")


def run_fresh(code, **env):
    env = {k: v for k, v in os.environ.items() if k not in JAX_ENV} | env
    return subprocess.run([sys.executable, "-c", code + FRESH_PROCESS_REPORT], env=env, capture_output=True,
                          text=True, check=True).stdout.split()


def test_bridge_imported_first_turns_off_preallocation_and_makes_jax_cpu_dispatch_inline():
    """JAX would reserve 75% of GPU memory; bridged CPU calls wait for their result anyway, so
    JAX's worker-thread hand-off is latency."""
    assert run_fresh("import bridge\n") == ["false", "False"]


def test_bridge_keeps_the_users_preallocation_and_cpu_dispatch_choices():
    assert run_fresh("import bridge\n", XLA_PYTHON_CLIENT_PREALLOCATE="true",
                     GATELOOP_HYBRID_JAX_CPU_ASYNC="1") == ["true", "True"]


def test_bridge_imported_after_jax_started_warns_once_of_gpu_memory_and_leaves_cpu_dispatch():
    """JAX's GPU backend started before the bridge (simulated: CI has no GPU) -> one warning; its
    CPU client exists already, so its dispatch stays as the user had it."""
    code = (
        "import warnings, jax\n"
        "from jax._src import xla_bridge\n"
        "jax.numpy.ones(1).block_until_ready()\n"
        "xla_bridge._backends['cuda'] = xla_bridge._backends['cpu']\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import bridge\n"
        "print(len(caught), caught[0].category.__name__ if caught else '-', repr(str(caught[0].message) if caught else ''))\n"
    )
    out = run_fresh(code)
    count, category, *message, _, async_dispatch = out
    assert count == "1" and category == "RuntimeWarning", out
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" in " ".join(message)
    assert async_dispatch == "True"     # JAX's CPU client existed: left as the user had it


# ---- 8. torch.compile ---------------------------------------------------------------------------


def test_torch_compile_fullgraph_values_and_gradients():
    f = jax2torch(lambda a, b: (jnp.sin(a) * b, jnp.cos(b)))

    def model(a, b):
        u, v = f(a * 2, b)
        return (u + v).sum()

    a = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(a, b)
    ga, gb = torch.autograd.grad(got, (a, b))
    want = model(a, b)
    ra, rb = torch.autograd.grad(want, (a, b))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


def test_opcheck_custom_op():
    from bridge.function import _op_call
    f = jax2torch(lambda a, b: jnp.sin(a) * b)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    spec, tensors = f._spec((a, b), {})
    torch.library.opcheck(_op_call, (tensors, spec.key, True))
    torch.library.opcheck(_op_call, ([a.detach(), b.detach()], spec.key, False))


class FakeJaxGpu:
    """What jax_gpu_for reads from a JAX device: its CUDA device ordinal in this process."""

    def __init__(self, local_hardware_id, id):
        self.local_hardware_id, self.id = local_hardware_id, id


def test_a_torch_gpu_maps_to_the_jax_device_on_the_same_gpu_not_the_same_position():
    from bridge.convert import jax_gpu_for, torch_index_of
    every = [FakeJaxGpu(0, id=0), FakeJaxGpu(1, id=1), FakeJaxGpu(2, id=2)]
    for i in range(3):  # JAX sees every GPU: position and ordinal agree
        assert jax_gpu_for(i, every) is every[i] and torch_index_of(every[i]) == i
    # JAX restricted to GPU 2 (a torchrun rank): its one device comes first in its list and may
    # be numbered 0, yet it is cuda:2
    only = [FakeJaxGpu(2, id=0)]
    assert jax_gpu_for(2, only) is only[0] and torch_index_of(only[0]) == 2
    with pytest.raises(ValueError, match=r"cuda:0 was passed, but JAX in this process uses only GPU\(s\) cuda:2.*"
                                         r"GATELOOP_HYBRID_JAX_GPUS=all"):
        jax_gpu_for(0, only)
    with pytest.raises(ValueError, match="uses no GPU"):
        jax_gpu_for(0, [])


@pytest.mark.parametrize("env,gpus,want", [
    ({}, 8, None),                                              # one process: JAX's default, every GPU
    ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 8, "3"),           # a torchrun rank: its own GPU
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1, "0"),           # two ranks share one GPU
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0, None),          # no GPU at all
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "GATELOOP_HYBRID_JAX_GPUS": "all"}, 8, None),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "GATELOOP_HYBRID_JAX_GPUS": "2,3"}, 8, "2,3"),
    ({"GATELOOP_HYBRID_JAX_GPUS": "5"}, 8, "5"),
])
def test_which_gpus_jax_may_use(env, gpus, want):
    from bridge._jax_env import visible_gpus
    assert visible_gpus(env, gpus) == want


def test_a_bad_gpu_list_is_refused_by_name():
    from bridge._jax_env import visible_gpus
    for bad in ("x", "1,-2", "0;1"):
        with pytest.raises(ValueError, match="GATELOOP_HYBRID_JAX_GPUS"):
            visible_gpus({"GATELOOP_HYBRID_JAX_GPUS": bad}, 2)


TORCHRUN_RANK_1 = dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")


@pytest.fixture
def jax_gpu_setting(monkeypatch):
    """restrict_gpus on the CPU: GPUs counted as torch counts them (``gpus``), JAX's backends not
    started (``started``), and the settings it makes recorded instead of applied (``updates``)."""
    import types
    import jax
    from jax._src import xla_bridge
    from bridge import _jax_env

    fake = types.SimpleNamespace(gpus=2, started={}, updates=[], update=jax.config.update)
    assert jax.config.values["jax_cuda_visible_devices"] == "all"
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GATELOOP_HYBRID_JAX_GPUS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_jax_env, "_gpu_count", lambda: fake.gpus)
    monkeypatch.setattr(xla_bridge, "_backends", fake.started)
    monkeypatch.setattr(jax.config, "update", lambda name, value: fake.updates.append((name, value)))
    return fake


@pytest.mark.parametrize("env,gpus,want", [
    ({}, 2, []),                                                            # one process: every GPU
    (TORCHRUN_RANK_1, 2, [("jax_cuda_visible_devices", "1")]),              # rank 1: GPU 1 only
    (dict(TORCHRUN_RANK_1, LOCAL_RANK="3", LOCAL_WORLD_SIZE="4"), 8, [("jax_cuda_visible_devices", "3")]),
    (dict(TORCHRUN_RANK_1, LOCAL_RANK="3", LOCAL_WORLD_SIZE="4"), 2, [("jax_cuda_visible_devices", "1")]),
    (TORCHRUN_RANK_1, 0, []),                                               # CPU ranks (gloo)
    (dict(TORCHRUN_RANK_1, GATELOOP_HYBRID_JAX_GPUS="all"), 2, []),
    (dict(TORCHRUN_RANK_1, GATELOOP_HYBRID_JAX_GPUS="0,1"), 2, [("jax_cuda_visible_devices", "0,1")]),
])
def test_under_torchrun_each_ranks_jax_is_restricted_to_its_gpu(jax_gpu_setting, monkeypatch, env, gpus, want):
    from bridge import _jax_env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    jax_gpu_setting.gpus = gpus
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _jax_env.restrict_gpus()
    assert jax_gpu_setting.updates == want


def test_the_users_jax_gpu_choice_is_kept(jax_gpu_setting, monkeypatch):
    from bridge import _jax_env
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    jax_gpu_setting.update("jax_cuda_visible_devices", "0")
    try:
        _jax_env.restrict_gpus()
    finally:
        jax_gpu_setting.update("jax_cuda_visible_devices", "all")
    assert jax_gpu_setting.updates == []


def test_a_rank_whose_jax_already_opened_every_gpu_is_warned(jax_gpu_setting, monkeypatch):
    from bridge import _jax_env
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    jax_gpu_setting.started["cpu"] = object()       # a CPU-only JAX that started: nothing to say
    _jax_env.restrict_gpus()
    jax_gpu_setting.started["cuda"] = object()      # JAX's GPU backend started: too late to restrict
    with pytest.warns(RuntimeWarning, match="uses every GPU, not only GPU 1 of this rank"):
        _jax_env.restrict_gpus()
    assert jax_gpu_setting.updates == []


def test_importing_the_bridge_in_a_torchrun_rank_restricts_jax_before_its_gpu_backend_starts():
    """Rank 1 of 2 on a machine with (simulated) 2 GPUs: JAX's jax_cuda_visible_devices is 1 once
    the bridge is imported, and the bridge still works (on the CPU)."""
    code = (
        "import torch\n"
        "torch.cuda.device_count = lambda: 2\n"
        "import bridge, jax\n"
        "print(jax.config.values['jax_cuda_visible_devices'])\n"
        "print(float(bridge.to_torch(bridge.to_jax(torch.ones(2))).sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GATELOOP_HYBRID_JAX_GPUS"}
    env.update(TORCHRUN_RANK_1)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "2.0"], (out.stdout, out.stderr[-500:])


class FakeCudaStreams:
    """torch.cuda's streams and events on a machine without CUDA: what the bridge asked for."""

    def __init__(self, monkeypatch):
        self.external, self.current = [], []
        fakes = self

        class ExternalStream:
            def __init__(self, handle, device=None):
                fakes.external.append((handle, str(device)))

            def wait_event(self, event):
                pass

        class Event:
            def record(self, stream=None):
                pass

        monkeypatch.setattr(torch.cuda, "ExternalStream", ExternalStream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", self.raw_stream, raising=False)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.raw_stream(device))

    def raw_stream(self, index):
        self.current.append(index)
        return 0x5000 + index


class FakeJaxBackend:
    def __init__(self, devices):
        self.devices = devices

    def local_devices(self):
        return list(self.devices)


def test_a_cuda_tensor_goes_to_the_jax_device_on_its_gpu_with_that_gpus_streams(monkeypatch):
    """A rank on cuda:1 whose JAX sees only that GPU (listed first, numbered 0): the tensor's JAX
    device, JAX's stream and torch's stream are all GPU 1's; a tensor on another GPU is refused."""
    from jax._src import xla_bridge
    from bridge import convert

    streams = FakeCudaStreams(monkeypatch)
    only = FakeJaxGpu(1, id=0)
    only.platform = "gpu"
    only.get_stream_for_external_ready_events = lambda: 0x7A0
    monkeypatch.setattr(xla_bridge, "get_backend", lambda platform: FakeJaxBackend([only]))
    link = convert._DeviceLink(convert._DL_CUDA, 1)
    assert link.jax_device is only and streams.external == [(0x7A0, "cuda:1")]
    link.torch_to_jax_order()
    assert set(streams.current) == {1}  # JAX waits for torch's current stream of cuda:1
    with pytest.raises(ValueError, match=r"cuda:0 was passed, but JAX in this process uses only GPU\(s\) cuda:1"):
        convert._DeviceLink(convert._DL_CUDA, 0)

    # back to torch: torch's current stream of cuda:1 waits for the array, not cuda:0's
    array = type("FakeArray", (), {"sharding": type("S", (), {"_device": only})()})()
    exchange = convert._Exchange()
    exchange._fast = (None, lambda a, stream: ("capsule", stream))
    monkeypatch.setattr(convert, "_from_dlpack", lambda capsule: capsule)
    assert exchange.to_torch([array]) == [("capsule", 0x5001)] and streams.current[-1] == 1


# ---- 9. double backward ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["residuals_are_inputs", "intermediate_residuals", "complex"])
def test_double_backward_matches_torch(kind):
    """A gradient of the gradient is JAX's derivative of the backward, never a constant."""
    if kind == "residuals_are_inputs":     # the vjp keeps only inputs: b and a
        f, dtype = jax2torch(lambda a, b: a * b), torch.float64
    elif kind == "intermediate_residuals":  # the vjp keeps cos(a): the inputs are saved as well
        f, dtype = jax2torch(lambda a, b: jnp.sin(a) * b), torch.float64
    else:
        f, dtype = jax2torch(lambda z, w: jnp.abs(z) ** 2 * w + jnp.conj(z) * jnp.exp(w)), torch.complex128
    a = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    b = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradgradcheck(f, (a, b))
    (ga,) = torch.autograd.grad(f(a, b).abs().pow(2).sum(), a, create_graph=True)
    assert ga.grad_fn is not None


def test_double_backward_refused_by_name_when_declared_impossible():
    from bridge import DoubleBackwardError
    f = jax2torch(lambda x: jnp.sin(x), name="kernel", double_backward=False)
    x = torch.randn(4, requires_grad=True)
    (g,) = torch.autograd.grad(f(x).sum(), x)                 # first order is fine
    torch.testing.assert_close(g, torch.cos(x.detach()))
    with pytest.raises(DoubleBackwardError, match="kernel: a gradient of its gradient"):
        torch.autograd.grad(f(x).sum(), x, create_graph=True)


def test_double_backward_under_torch_compile_raises():
    f = jax2torch(lambda x: jnp.sin(x))
    x = torch.randn(4, requires_grad=True)
    y = torch.compile(lambda x: f(x).sum(), fullgraph=True, backend="aot_eager")(x)
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ---- 10. cache hygiene ---------------------------------------------------------------------------


def test_a_failed_trace_leaves_nothing_behind():
    calls = []

    def fn(x):
        calls.append(1)
        if len(calls) == 1:
            raise NameError("name 'undefined' is not defined")
        return x * 2
    f = jax2torch(fn)
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(NameError):
        f(x)
    torch.testing.assert_close(f(x), 2 * x)           # same shape, traced again
    f(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_caches_are_bounded_and_warn_once(monkeypatch):
    import bridge.function as bf
    monkeypatch.setattr(bf, "MAX_STATIC_VALUES", 4)
    monkeypatch.setattr(bf, "MAX_SIGNATURES", 3)

    class Opaque:          # hashed by identity: a new one never matches a cached trace
        pass
    f = jax2torch(lambda x, tag: x + 1, name="tagged")
    x = torch.ones(2)
    with pytest.warns(RuntimeWarning, match="tagged: called with more than 4 different static"):
        for _ in range(10):
            torch.testing.assert_close(f(x, Opaque()), x + 1)
    assert len(f._specs) <= 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(x, Opaque())                                # said once only
    with pytest.warns(RuntimeWarning, match="not equal to itself"):
        f(x, float("nan"))
    g = jax2torch(lambda x: x * 2, name="shapes")
    with pytest.warns(RuntimeWarning, match="shapes: called with more than 3 different input shapes"):
        for n in range(1, 8):
            torch.testing.assert_close(g(torch.ones(n)), torch.full((n,), 2.0))
    spec = next(iter(g._specs.values()))
    assert len(spec.signatures) <= 3 and len(spec._traced) <= 3
    torch.testing.assert_close(g(torch.ones(1)), torch.full((1,), 2.0))   # an evicted shape again


def test_outputs_never_share_memory_with_inputs_or_each_other():
    f = jax2torch(lambda x: (x, x, x * 2))
    x = torch.randn(4)
    a, b, c = f(x)
    ptrs = {x.data_ptr(), a.data_ptr(), b.data_ptr(), c.data_ptr()}
    assert len(ptrs) == 4
    a.add_(1.0)
    torch.testing.assert_close(b, x)


def test_sparse_and_nested_tensors_refused_by_name():
    f = jax2torch(lambda x, y: x + y, name="add")
    with pytest.raises(TypeError, match=r"add: argument args\[1\] has layout torch.sparse_coo"):
        f(torch.ones(2), torch.ones(2).to_sparse())
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(TypeError, match=r"add: argument args\[0\] is a nested tensor"):
        f(nested, torch.ones(2))
    with pytest.raises(TypeError, match="layout torch.sparse_csr"):
        to_jax(torch.eye(3).to_sparse_csr())
    f(torch.ones(2), torch.ones(2))           # the fast path (a known spec) checks layouts too
    with pytest.raises(TypeError, match="sparse"):
        f(torch.ones(2), torch.ones(2).to_sparse())


# ---- 11. torch.func transforms and threads ------------------------------------------------------


def test_vmap_and_reverse_mode_func_transforms():
    f = jax2torch(lambda a, b: (jnp.sin(a) * b, jnp.sum(a)), name="sinmul")
    xs = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    u, s = torch.vmap(f, in_dims=(0, None))(xs, y)
    torch.testing.assert_close(u, torch.sin(xs) * y)
    torch.testing.assert_close(s, xs.sum(1))
    u, _ = torch.vmap(f, in_dims=(1, None))(xs.T, y)                 # batch on dim 1, strided
    torch.testing.assert_close(u, torch.sin(xs) * y)
    grad = torch.func.grad(lambda a: f(a, y)[0].sum())
    torch.testing.assert_close(grad(xs[0]), torch.cos(xs[0]) * y)
    torch.testing.assert_close(torch.vmap(grad)(xs), torch.cos(xs) * y)
    sum_then_grad = torch.func.grad(lambda a: torch.vmap(lambda r: f(r, y)[0])(a).sum())
    torch.testing.assert_close(sum_then_grad(xs), torch.cos(xs) * y)
    hess = torch.func.jacrev(torch.func.jacrev(lambda a: f(a, y)[0].sum()))(xs[0])
    torch.testing.assert_close(hess, torch.diag(-torch.sin(xs[0]) * y))
    with pytest.raises(NotImplementedError, match="sinmul: forward-mode AD"):
        torch.func.jacfwd(lambda a: f(a, y)[0])(xs[0])
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="sinmul: forward-mode AD"):
        f(fwAD.make_dual(xs[0], torch.ones_like(xs[0])), y)      # never a dropped tangent


def test_concurrent_first_calls_from_threads():
    from concurrent.futures import ThreadPoolExecutor
    f = jax2torch(lambda a, b: jnp.tanh(a) * b)

    def work(n):
        a = torch.randn(n % 5 + 1, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(n % 5 + 1, 3, dtype=torch.float64)
        out = f(a, b)
        (g,) = torch.autograd.grad(out.sum(), a)
        return torch.allclose(out, torch.tanh(a) * b) and torch.allclose(g, (1 - torch.tanh(a) ** 2) * b)
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(24)))
