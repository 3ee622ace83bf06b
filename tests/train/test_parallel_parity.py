"""TP/SP, EP (alltoall, allgather), TP+EP and PP layouts reproduce the 1-process actor (2 gloo ranks).

Every layout starts from the same global weights (``init_layout_invariant_``), computes the
log-probs of one synthetic batch and runs 2 rollout batches x 2 optimizer updates; log-probs
must agree to 1e-5 and loss / grad-norm trajectories to 1e-4 relative, for free routing and
routing replay R2 / R3.
"""

import pytest
import torch
from _dist import run_distributed

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo parity tests")]

TP2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
EP2 = {"expert_model_parallel_size": 2}
EP2_AG = {"expert_model_parallel_size": 2, "moe_token_dispatcher_type": "allgather"}
TP2_EP2 = {**TP2, "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1}
PP2 = {"pipeline_model_parallel_size": 2}
ROUTINGS = ("disabled", "R2", "R3")


@pytest.fixture(scope="module")
def reference():
    from actor_cases import layout_runs

    cases = [({}, r, "tiny") for r in ROUTINGS] + [({}, r, "tiny-4l") for r in ROUTINGS]
    return run_distributed(layout_runs, 1, cases, timeout=400)[0]


def _compare(ref, runs, keys):
    for rank_out in runs:
        for key in keys:
            a, b = ref[key], rank_out[key]
            m = a["mask"] > 0
            lp_err = (a["lp"][m] - b["lp"][m]).abs().max().item()
            ent_err = (a["entropy"][m] - b["entropy"][m]).abs().max().item()
            assert lp_err < 1e-5 and ent_err < 1e-5, f"{key}: log-prob err {lp_err}, entropy err {ent_err}"
            assert len(a["traj"]) == len(b["traj"]) == 4
            for step, (x, y) in enumerate(zip(a["traj"], b["traj"])):
                for name in ("loss", "grad_norm", "loss/micro_batch_sum"):
                    assert y[name] == pytest.approx(x[name], rel=1e-4, abs=1e-6), f"{key} update {step} {name}"


def test_reference_run_is_sane(reference):
    for key, run in reference.items():
        traj = run["traj"]
        # staleness: update 1 of each rollout batch sees its own old log-probs (W = 1), update 2 does not
        assert traj[0]["is/seq_log_w_absmax"] == 0.0 and traj[1]["is/seq_log_w_absmax"] > 0, key
        assert all(t["grad_norm"] > 0 for t in traj), key
    # forced (R3) routes change the model's log-probs; R2 starts from the free routing
    assert not torch.allclose(reference["tiny/R3"]["lp"], reference["tiny/disabled"]["lp"])
    assert torch.equal(reference["tiny/R2"]["lp"], reference["tiny/disabled"]["lp"])


def test_tp2_sequence_parallel_matches_one_process(reference):
    from actor_cases import layout_runs

    runs = run_distributed(layout_runs, 2, [(TP2, r, "tiny") for r in ROUTINGS], timeout=400)
    _compare(reference, runs, [f"tiny/{r}" for r in ROUTINGS])


def test_ep2_alltoall_matches_one_process(reference):
    from actor_cases import layout_runs

    runs = run_distributed(layout_runs, 2, [(EP2, r, "tiny") for r in ROUTINGS], timeout=400)
    _compare(reference, runs, [f"tiny/{r}" for r in ROUTINGS])


def test_ep2_allgather_tp2_ep2_and_pp2_match_one_process(reference):
    """PP2 with R3 checks the rollout routes are sliced to each pipeline stage's layers."""
    from actor_cases import layout_runs

    cases = [(EP2_AG, "disabled", "tiny"), (TP2_EP2, "R3", "tiny"), (PP2, "disabled", "tiny-4l"),
             (PP2, "R2", "tiny-4l"), (PP2, "R3", "tiny-4l")]
    runs = run_distributed(layout_runs, 2, cases, timeout=400)
    # layout_runs keys by preset/routing; each case has a distinct key
    _compare(reference, runs, ["tiny/disabled", "tiny/R3", "tiny-4l/disabled", "tiny-4l/R2", "tiny-4l/R3"])
