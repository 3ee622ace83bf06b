"""``megatron-vespo plan``: a full-scale dry run of a job on a CPU machine, before any GPU is allocated.

* :mod:`.layout` reads the job (world size, memory options) and refuses layouts that cannot work,
  naming the field to change.
* :mod:`.shards` builds every distinct rank's ``GPTModel`` shard on the ``meta`` device under
  torch's fake process group and runs the HF export/import mapping on those shards.
* :mod:`.hf_index` derives a checkpoint's tensor index (names and shapes) from ``config.json``.
* :mod:`.activations` / :mod:`.memory` estimate bytes per GPU, :mod:`.sync` the weight-sync plan.
* :mod:`.report` ties them together (``run_plan``) and renders the table / JSON; :mod:`.cli`
  registers the subcommand. See docs/planning.md.
"""
