"""The private JAX calls of the bridge's exchange and settings, in one place, because they move.
(The Mosaic GPU launcher's are in ``_mosaic_abi``.) Checked with jax/jaxlib 0.10.2 and 0.11.2;
each caller treats ``None`` or an exception from here as "not available" and takes its public path.

- ``started_backends()``: the names of the JAX backends already started (settings chosen too late
  cannot apply);
- ``xla_backend(platform)``: JAX's backend object for "cpu" or "cuda" (its devices by local
  hardware id, its stream for external buffers);
- ``dlpack_raw()``: jaxlib's capsule import and export below ``jax.dlpack`` (about 7 us against
  62 us through the public function on an H200), or None.
"""

from __future__ import annotations

CHECKED = ("0.10.2", "0.11.2")


def started_backends() -> dict:
    from jax._src import xla_bridge
    return getattr(xla_bridge, "_backends", None) or {}


def xla_backend(platform: str):
    from jax._src import xla_bridge
    return xla_bridge.get_backend(platform)


def dlpack_raw():
    """(import_fn(capsule, device, stream, dl_type), export_fn(array, stream)), or None."""
    try:
        from jax._src.lib import _jax, jaxlib_extension_version
        import_raw = _jax.dlpack_managed_tensor_to_buffer
        export_raw = _jax.buffer_to_dlpack_managed_tensor
    except (ImportError, AttributeError):
        return None
    if jaxlib_extension_version >= 467:     # the DLPack device type became an argument
        import_fn = lambda capsule, device, stream, dl_type: import_raw(capsule, device, stream, False, dl_type)
    else:
        import_fn = lambda capsule, device, stream, dl_type: import_raw(capsule, device, stream, False)
    export_fn = lambda array, stream: export_raw(array, stream=stream)
    return import_fn, export_fn
