"""adapt-pretrain: online ADAPT data reweighting for megatron-core pretraining."""
from setuptools import find_packages, setup

# torch must be installed first with `pip install torch==2.13.0` (see README): letting pip resolve
# torch on its own downloads a multi-GB CUDA build on CPU machines.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "triton==3.7.1",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "webdataset==1.0.2",
    "wandb==0.31.0",
    "tokenizers>=0.20",
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "numpy>=1.24",
]

setup(
    name="adapt-pretrain",
    version="0.1.0",
    description="Online ADAPT data reweighting for large-scale LLM pretraining (megatron-core + deepspeed)",
    # Found, not listed: a package missing from a hand-written list once shipped a broken wheel.
    # `adapt_pretrain.kernels` lives in the top-level `kernels/` (see package_dir), so it is added by name.
    packages=find_packages(include=["adapt_pretrain", "adapt_pretrain.*"]) + ["adapt_pretrain.kernels"],
    # Top-level `kernels/` is shipped as `adapt_pretrain.kernels`: a top-level module named
    # `kernels` collides with an unrelated PyPI package.
    package_dir={"adapt_pretrain.kernels": "kernels"},
    package_data={"adapt_pretrain": ["demo_data/*", "demo_data/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={"console_scripts": ["adapt-pretrain=adapt_pretrain.cli:main"]},
)
