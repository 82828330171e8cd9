from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="gateloop-hybrid",
    version="0.1.0",
    description="GateLoop Transformer layers in PyTorch with the recurrence in JAX, "
                "and a generic zero-copy JAX-to-torch bridge",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["bridge", "bridge.*", "gateloop_hybrid", "gateloop_hybrid.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",          # torch.library.custom_op / register_autograd
        "jax>=0.7",            # __dlpack__-protocol DLPack import
        "jaxlib>=0.7",
        "einops>=0.7",
        "numpy",
        "absl-py",             # Pallas's Mosaic GPU interpret mode: bridge.MosaicKernel on CPU tensors
        "safetensors",         # Transformer.save_pretrained / from_pretrained
    ],
    extras_require={
        # JAX with its CUDA 13 plugin, for CUDA tensors (the jax and pallas scan backends on GPU);
        # Mosaic GPU (the launcher, Hopper and newer) needs jaxlib >= 0.11.1.
        "cuda": ["jax[cuda13]>=0.7"],
        "cuda12": ["jax[cuda12]>=0.7"],
        # the model in pure JAX (gateloop_hybrid.jax) and its training step (train.py --framework jax)
        "jax": ["equinox>=0.11", "optax>=0.2"],
        "test": ["pytest>=7", "pytest-xdist", "gateloop-transformer==0.2.5", "rotary-embedding-torch",
                 "equinox>=0.11", "optax>=0.2"],
        "bench": ["tqdm", "matplotlib"],
        "train": ["tqdm"],
    },
    entry_points={
        "console_scripts": [
            "gateloop-train = gateloop_hybrid.training.cli:train_main",    # python train.py
            "gateloop-sample = gateloop_hybrid.training.cli:sample_main",  # python sample.py
        ],
    },
)
