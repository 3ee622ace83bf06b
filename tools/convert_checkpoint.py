#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron formats (same as ``megatron-vespo convert``).

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir Qwen3-30B-A3B-Base --out ckpt/base --ep 8
    python tools/convert_checkpoint.py mcore-to-hf --ckpt ckpt/run --out hf/step100 --dtype bfloat16

Run ``python tools/convert_checkpoint.py hf-to-mcore --help`` for every option.
"""

import sys

from megatron_vespo.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
