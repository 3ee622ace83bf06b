"""Held-out evaluation of a policy: avg@k, pass@k and greedy accuracy through the rollout engines.

Open ``core`` first: ``evaluate`` scores prompts through an ``EngineRouter`` (embedded or SGLang,
the same client the loop uses). ``config`` holds ``EvalConfig`` (the job's ``eval`` section);
``cli`` is ``megatron-vespo eval``. The training loops call ``evaluate`` every ``loop.eval_every``
rollouts.
"""
