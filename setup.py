"""Packaging for megatron_vespo (setup.py, as users of Megatron forks expect).

Tested ranges (``megatron_vespo/utils/versions.py`` checks them at start-up and says why each
bound is there): megatron-core 0.16.x (``compat/cpu.py`` patches 0.16.1 internals by line) and
transformers 5.x (route capture hooks transformers 5's ``Qwen3MoeTopKRouter``).
"""

from setuptools import find_packages, setup

MEGATRON_CORE = "megatron-core>=0.16.1,<0.17"
TRANSFORMERS = "transformers>=5.0,<6"

# The embedded server's event loop, HTTP parser and JSON, as SGLang's server runs (it depends on
# uvloop and orjson and answers with ORJSONResponse): on CPU they cut the fixed cost of a batched
# /generate by ~3 ms (docs/performance.md, "HTTP transport"). uvicorn picks uvloop and httptools
# by itself when they are installed; everything works without them, slower.
FAST_SERVE = ["uvicorn>=0.29", "uvloop>=0.19; sys_platform != 'win32'", "httptools>=0.6", "orjson>=3.9"]

CPU_EXTRAS = [
    MEGATRON_CORE,
    "psutil",
    "pybase64",
    TRANSFORMERS,
    "safetensors>=0.4",
    "fastapi>=0.110",
    *FAST_SERVE,
    "httpx>=0.27",
    "ray>=2.40",
    "wandb>=0.17",
    "math-verify>=0.7",
    "tqdm>=4.66",
    "matplotlib>=3.7",
]

EXTRAS = {
    # Megatron-Core trainer, tested on 0.16.1 (the newest release for Python 3.11).
    # psutil: megatron-core's dist-checkpoint writer imports it (and hangs without it).
    "megatron": [MEGATRON_CORE, TRANSFORMERS, "safetensors>=0.4", "psutil"],
    # Rollout side: the SGLang engine (GPU) and our HTTP client / embedded server deps.
    # protocol and flags read against sglang 0.5.20-0.5.23 (0.5.23 itself pins transformers==5.19.0,
    # inside TRANSFORMERS); a 0.6 may change them
    "sglang": ["sglang[all]>=0.5.4,<0.6", "httpx>=0.27", "pybase64", "orjson>=3.9"],
    "serve": ["fastapi>=0.110", *FAST_SERVE, "httpx>=0.27", TRANSFORMERS, "pybase64"],
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
