"""Config system: YAML + dotted overrides, errors that name the key, every example validates."""

from pathlib import Path

import pytest

from megatron_vespo.config import ConfigError, apply_overrides, dump_config, load_config
from megatron_vespo.config.job import JobConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def test_defaults_validate():
    cfg = JobConfig()
    assert cfg.parallel.tensor_model_parallel_size == 1
    assert cfg.train.staleness == 1


def test_overrides_apply_with_yaml_types(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("train:\n  lr: 1.0e-6\n  rollout_batch_size: 64\n  mini_batch_size: 8\n")
    cfg = load_config(JobConfig, p, ["train.lr=2e-6", "parallel.expert_model_parallel_size=2",
                                     "routing.mode=R2", "loss.params={c1_pos: 1.5}"])
    assert cfg.train.lr == 2e-6
    assert cfg.train.staleness == 8
    assert cfg.parallel.expert_model_parallel_size == 2
    assert cfg.routing.mode == "R2"
    assert cfg.loss.params == {"c1_pos": 1.5}


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(JobConfig, None, ["train.lrr=1e-6"])


def test_bad_choice_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as exc:
        load_config(JobConfig, None, ["routing.mode=R4"])
    msg = str(exc.value)
    assert "routing.mode" in msg and "'R2'" in msg and "'R3'" in msg and "R4" in msg


def test_bad_type_names_key():
    with pytest.raises(ConfigError, match=r"parallel\.tensor_model_parallel_size"):
        load_config(JobConfig, None, ["parallel.tensor_model_parallel_size=two"])


def test_cross_field_errors_name_fields():
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(JobConfig, None, ["train.rollout_batch_size=12", "train.mini_batch_size=8"])
    with pytest.raises(ConfigError, match="exceeds 256"):
        load_config(JobConfig, None, ["train.rollout_batch_size=4104", "train.mini_batch_size=8",
                                      "rollout.n_samples_per_prompt=8"])
    with pytest.raises(ConfigError, match="return_routed_experts"):
        load_config(JobConfig, None, ["routing.mode=R3"])
    with pytest.raises(ConfigError, match="sequence_parallel"):
        load_config(JobConfig, None, ["parallel.sequence_parallel=true"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(JobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(JobConfig, bad)


def test_unknown_loss_lists_known_ones():
    with pytest.raises(ConfigError) as exc:
        load_config(JobConfig, None, ["loss.name=nope"])
    assert "vespo" in str(exc.value) and "grpo" in str(exc.value)


def test_dump_round_trips(tmp_path):
    cfg = load_config(JobConfig, None, ["train.lr=3e-6"])
    p = tmp_path / "dumped.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(JobConfig, p) == cfg


def test_examples_exist():
    assert EXAMPLES, "examples/ must hold job YAMLs"


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_every_example_yaml_validates(path):
    cfg = load_config(JobConfig, path)
    assert cfg.train.staleness >= 1


def test_cli_config_command(capsys):
    from megatron_vespo.cli import main

    assert main(["config", "--set", "train.lr=4e-6"]) == 0
    assert "lr: 4.0e-06" in capsys.readouterr().out
    assert main(["config", "--set", "routing.mode=R9"]) == 2


def test_parallel_world_size_check_names_the_fields():
    from megatron_vespo.train.config import ParallelConfig

    ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2,
                   expert_tensor_parallel_size=1).check_world_size(2)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True).check_world_size(2)
    with pytest.raises(ConfigError, match="expert_tensor_parallel_size=1"):
        ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                       expert_model_parallel_size=2).check_world_size(2)


def test_unknown_key_suggests_the_closest_or_lists_the_section():
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.temprature: unknown key; did you mean 'temperature'\?"):
        load_config(JobConfig, None, ["rollout.sampling.temprature=1.0"])
    with pytest.raises(ConfigError, match=r"trian: unknown key; did you mean 'train'\?"):
        load_config(JobConfig, None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"train\.zzzzzz: unknown key; valid keys here: rollout_batch_size, "):
        load_config(JobConfig, None, ["train.zzzzzz=1"])


def test_single_sample_groups_are_rejected():
    with pytest.raises(ConfigError, match=r"rollout.n_samples_per_prompt must be >= 2"):
        load_config(JobConfig, None, ["rollout.n_samples_per_prompt=1"])


def test_switching_loss_keeps_old_params_hint(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("loss:\n  name: vespo\n  params: {c1_pos: 2.0}\n")
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) c1_pos for loss 'grpo'.*--set 'loss.params=\{\}'"):
        load_config(JobConfig, cfg, ["loss.name=grpo"])
    assert load_config(JobConfig, cfg, ["loss.name=grpo", "loss.params={}"]).loss.name == "grpo"
    with pytest.raises(ConfigError, match=r"must be a number, got 'x'\n|must be a number, got 'x'$"):
        load_config(JobConfig, cfg, ["loss.params.c1_pos=x"])


def test_one_process_for_a_multi_rank_layout_says_torchrun():
    from megatron_vespo.train.config import ParallelConfig

    with pytest.raises(ConfigError, match=r"needs a multiple of 2 ranks and this is one process: launch it with "
                                          r"torchrun --nproc-per-node 2 -m megatron_vespo.cli"):
        ParallelConfig(expert_model_parallel_size=2).check_world_size(1)
    ParallelConfig().check_world_size(1)


def test_rollout_old_log_probs_with_rollout_is_weights_is_refused():
    """pi_old := mu_rollout makes the TIS/MIS weights pi_old / mu exactly 1: a silent no-op."""
    with pytest.raises(ValueError, match="old_log_prob_source=rollout"):
        JobConfig.model_validate({"train": {"old_log_prob_source": "rollout"},
                                  "loss": {"rollout_is": {"enabled": True}}})
    JobConfig.model_validate({"train": {"old_log_prob_source": "recompute"}, "loss": {"rollout_is": {"enabled": True}}})


def test_weight_sync_kind_and_deprecated_loop_alias(tmp_path, caplog):
    assert load_config(JobConfig, None, ["weight_sync.kind=distributed"]).weight_sync.kind == "distributed"
    # the old key still works, from --set and from YAML, and lands in weight_sync.kind
    with caplog.at_level("WARNING"):
        cfg = load_config(JobConfig, None, ["loop.weight_sync=tensor", "weight_sync.bucket_mb=64"])
    assert cfg.weight_sync.kind == "tensor" and cfg.weight_sync.bucket_mb == 64
    assert cfg.loop.weight_sync is None and "deprecated" in caplog.text
    p = tmp_path / "old.yaml"
    p.write_text("loop:\n  weight_sync: distributed\n  num_rollouts: 3\n")
    cfg = load_config(JobConfig, p)
    assert (cfg.weight_sync.kind, cfg.loop.num_rollouts) == ("distributed", 3)
    assert "weight_sync" not in dump_config(cfg).split("loop:")[1].split("weight_sync:")[0]  # not dumped under loop
    assert load_config(JobConfig, None, ["loop.weight_sync=disk", "weight_sync.kind=disk"]).weight_sync.kind == "disk"
    with pytest.raises(ConfigError, match="loop.weight_sync=tensor and weight_sync.kind=distributed disagree"):
        load_config(JobConfig, None, ["loop.weight_sync=tensor", "weight_sync.kind=distributed"])
    with pytest.raises(ConfigError, match="loop.weight_sync"):
        load_config(JobConfig, None, ["loop.weight_sync=ipc"])


def test_lr_schedule_spans_the_run_and_warmup_must_fit():
    """train.train_iters defaulted to 1, so lr_warmup_steps was silently clipped to no warm-up."""
    job = load_config(JobConfig, None, ["loop.num_rollouts=40", "train.lr_warmup_steps=8"])
    assert job.train.train_iters == 40
    assert load_config(JobConfig, None, ["loop.num_rollouts=40", "train.train_iters=5"]).train.train_iters == 5
    with pytest.raises(ConfigError, match=r"train.lr_warmup_steps \(80\).*= 40"):
        load_config(JobConfig, None, ["loop.num_rollouts=40", "train.lr_warmup_steps=80"])
