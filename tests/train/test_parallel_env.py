"""A 1-process init_parallel must not write launcher variables into os.environ.

They would leak into every subprocess (a later `megatron-vespo train` or torchrun child reused
the parent's MASTER_PORT and failed with EADDRINUSE).
"""

import os
import subprocess
import sys
import textwrap


def test_single_process_init_leaves_environment_alone():
    code = textwrap.dedent("""
        import os
        from megatron_vespo.train.config import ParallelConfig
        from megatron_vespo.train.parallel import destroy_parallel, init_parallel
        init_parallel(ParallelConfig())
        leaked = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ]
        assert not leaked, leaked
        destroy_parallel(destroy_process_group=True)
        init_parallel(ParallelConfig())  # a second group in the same process still works
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_parallel_session_tears_down_what_it_created():
    code = textwrap.dedent("""
        import torch
        from megatron.core import parallel_state
        from megatron_vespo.parallel.config import ParallelConfig
        from megatron_vespo.parallel.state import init_parallel, parallel_session
        try:
            with parallel_session(ParallelConfig()) as info:
                assert info.world_size == 1 and parallel_state.model_parallel_is_initialized()
                raise KeyError("boom")
        except KeyError:
            pass
        # torn down on an exception too, process group included (this block created it)
        assert not parallel_state.model_parallel_is_initialized() and not torch.distributed.is_initialized()
        init_parallel(ParallelConfig())  # a group the caller owns...
        with parallel_session(ParallelConfig()):
            pass
        # ...outlives the block; only the Megatron groups are gone
        assert torch.distributed.is_initialized() and not parallel_state.model_parallel_is_initialized()
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
