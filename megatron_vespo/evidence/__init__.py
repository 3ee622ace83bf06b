"""Evidence: controlled studies of the losses (issue: held-out evaluation and staleness).

* ``mechanism``: each loss's gradient on samples k updates stale against the on-policy gradient
  (cosine, relative error, resample variance, ESS and the W distribution); the paper's Prop. 3.1
  measured on a small Qwen3-MoE. Command: ``python tools/mechanism_study.py``.
"""
