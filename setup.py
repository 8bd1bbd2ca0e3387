from setuptools import find_packages, setup

setup(
    name="mixpo",
    version="0.1.0",
    description="Difficulty-aware preference optimization (MixDPO, Selective DPO, gamma-PO) "
    "with fused Triton kernels and a logit-free LM-head loss.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mixpo", "mixpo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=4.45",
        "safetensors",
        "numpy",
        "pyyaml",
        "datasets",
        "pyarrow",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["mixpo=mixpo.cli:main"]},
)
