"""Packaging for megatron_vespo (setup.py, as users of Megatron forks expect)."""

from setuptools import find_packages, setup

CPU_EXTRAS = [
    "megatron-core>=0.16.1",
    "psutil",
    "pybase64",
    "transformers>=4.57",
    "safetensors>=0.4",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "httpx>=0.27",
    "ray>=2.40",
    "wandb>=0.17",
    "math-verify>=0.7",
    "tqdm>=4.66",
    "matplotlib>=3.7",
]

EXTRAS = {
    # Megatron-Core trainer. CI pins 0.16.1 (the newest release for Python 3.11).
    # psutil: megatron-core's dist-checkpoint writer imports it (and hangs without it).
    "megatron": ["megatron-core>=0.16.1", "transformers>=4.57", "safetensors>=0.4", "psutil"],
    # Rollout side: the SGLang engine (GPU) and our HTTP client / embedded server deps.
    "sglang": ["sglang[all]>=0.5.4", "httpx>=0.27", "pybase64"],
    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "transformers>=4.57", "pybase64"],
    "ray": ["ray>=2.40"],
    "fp8": ["transformer-engine[pytorch]>=2.4"],
    "apex": ["apex"],
    "wandb": ["wandb>=0.17"],
    "cpu": CPU_EXTRAS,
    # arviz-stats: the reference PSIS that tests/losses/test_psis_adaptive.py checks ours against
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.6", "arviz-stats>=0.8"],
}

setup(
    name="megatron_vespo",
    version="0.1.0",
    description="Off-policy RL post-training for MoE LLMs on Megatron-Core with VESPO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_vespo", "megatron_vespo.*"]),
    install_requires=["torch>=2.4", "numpy", "pyyaml>=6", "pydantic>=2.6"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-vespo=megatron_vespo.cli:main"]},
)
