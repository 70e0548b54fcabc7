"""megareuse: reuse-or-scratch studies for LLM pretraining, and the trainer that runs them."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = next(line.split('"')[1] for line in (HERE / "megareuse" / "__init__.py").read_text().splitlines()
               if line.startswith("__version__"))
PACKAGES = find_packages(include=["megareuse", "megareuse.*"])

setup(
    name="megareuse",
    version=VERSION,
    description=__doc__,
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/megareuse_kernels/ and import as `megareuse_kernels`.
    # kernels/ itself is no package: a checkout on sys.path (python -m pytest, python -c in the
    # repository) must not shadow the PyPI project `kernels`, which transformers imports.
    packages=PACKAGES + ["megareuse_kernels"],
    package_dir={"megareuse_kernels": "kernels/megareuse_kernels"},
    install_requires=[
        "torch>=2.4",  # install it first (see Makefile) so an existing CUDA torch is kept
        "numpy>=1.24",
        "pyyaml>=6",
        "sentencepiece>=0.2",
        "tqdm>=4.60",
        "scipy>=1.10",  # the law fitter
        "threadpoolctl>=3",  # one BLAS thread per bootstrap worker
        "deepspeed>=0.17",  # the training engine (ZeRO, data parallelism)
        "safetensors>=0.4",  # Hugging Face checkpoints (import-hf / export-hf)
    ],
    extras_require={
        # tests: Triton kernels under the interpreter, the mpirun launcher, the figures
        "dev": ["pytest>=7", "pytest-timeout>=2", "triton>=3.0", "mpi4py>=3.1", "matplotlib>=3.7",
                "transformers>=4.40", "tokenizers>=0.15", "tensorboard>=2.14",
                "pyarrow>=12", "zstandard>=0.21", "datasets>=2.14", "torchtitan>=0.2,<0.3"],
        # your own corpora in `megareuse prepare --input`: parquet / HF save_to_disk, .jsonl.zst
        "corpus": ["pyarrow>=12", "zstandard>=0.21"],
        "hf": ["transformers>=4.40", "tokenizers>=0.15"],
        # benchmarks/train_throughput.py's peers (torchtitan 0.3 takes flex / varlen attention only)
        "bench": ["transformers>=4.40", "torchtitan>=0.2,<0.3"],
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["megareuse = megareuse.cli:main"]},
)
