"""Config values that would fail later are refused at load: non-finite numbers, prompt + response beyond the context."""

import pytest

from megatron_vespo.config.base import ConfigError, load_config
from megatron_vespo.config.job import JobConfig
from megatron_vespo.data import check_context_length
from megatron_vespo.data.config import DataConfig

CFG = "examples/configs/tiny_cpu_vespo.yaml"


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("loss.params.c1_pos=.nan", "params.c1_pos=nan"),
    ("rollout.sampling.temperature=.nan", "rollout.sampling.temperature"),
    ("rollout.sampling.top_p=-.inf", "rollout.sampling.top_p"),
    ("rollout.server_args.mem_fraction_static=.inf", "server_args.mem_fraction_static=inf"),
    ("rollout.server_args.cuda_graph_bs=[1, .nan]", "server_args.cuda_graph_bs[1]=nan"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, CFG, [override])
    assert key in str(err.value), str(err.value)


def test_assignment_is_checked_too():
    job = load_config(JobConfig, CFG)
    with pytest.raises(ValueError, match="finite"):
        job.train.lr = float("inf")
    with pytest.raises(ValueError, match="params.c1_pos=nan"):
        job.loss.params = {"c1_pos": float("nan")}


def test_finite_values_still_load():
    job = load_config(JobConfig, CFG, ["train.lr=2e-5", "loss.params.c1_pos=2.0"])
    assert job.train.lr == 2e-5


def test_prompt_plus_response_beyond_the_context_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.max_prompt_len 64\) \+ rollout.sampling.max_new_tokens 500 = 564 "
                                          r"tokens exceeds max_position_embeddings 512 of model.preset tiny"):
        check_context_length(DataConfig(source="jsonl", path="x.jsonl", max_prompt_len=64), 500, 512,
                             "model.preset tiny")
    check_context_length(DataConfig(source="jsonl", path="x.jsonl", max_prompt_len=12), 500, 512)  # fits
    check_context_length(DataConfig(max_prompt_len=64), 504, 512)  # synthetic prompts are <= 8 tokens


def test_the_loop_refuses_it_before_building_anything(tmp_path):
    from megatron_vespo.orchestration.setup import prepare_loop

    job = load_config(JobConfig, CFG, ["rollout.sampling.max_new_tokens=100000", f"loop.output_dir={tmp_path}/o"])
    with pytest.raises(ConfigError, match="100008 tokens exceeds max_position_embeddings 512"):
        prepare_loop(job)
    assert not (tmp_path / "o").exists()
