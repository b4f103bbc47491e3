"""adapt-pretrain: online ADAPT data reweighting for megatron-core pretraining."""
from setuptools import find_packages, setup

# Compatible ranges, so the package installs into an existing stack (an NGC or cluster image with its
# own torch) without replacing it. The tested set is constraints.txt, which launch/install.sh and CI
# use (`pip install -c constraints.txt ...`); the README states the supported range.
# torch must be installed first (launch/install.sh does, pinned by constraints.txt): letting pip
# resolve torch on its own downloads a multi-GB CUDA build on CPU machines.
INSTALL_REQUIRES = [
    "torch>=2.6",                  # megatron-core 0.16's own floor
    "triton>=3.2",                 # the one a torch >= 2.6 CUDA build brings; CPU runs use the torch reference
    "megatron-core>=0.15.3,<0.17",
    "deepspeed>=0.19,<0.20",
    "webdataset>=1.0,<2",
    "wandb>=0.17,<1",
    "tokenizers>=0.20",
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "numpy>=1.24",
    "safetensors>=0.4",  # `adapt-pretrain export` writes Hugging Face checkpoints
]
# transformers: the DeepSpeed engine path's tests and example (a Hugging Face causal LM); the
# adapter itself only needs the model's output layer, so it is not an install requirement.
TEST_REQUIRES = ["pytest>=7", "hypothesis>=6", "transformers>=5,<6"]

setup(
    name="adapt-pretrain",
    version="0.1.0",
    description="Online ADAPT data reweighting for large-scale LLM pretraining (megatron-core, DeepSpeed)",
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
    extras_require={"test": TEST_REQUIRES, "hf": ["transformers>=5,<6"]},
    entry_points={"console_scripts": ["adapt-pretrain=adapt_pretrain.cli:main"]},
)
