"""MegatronActor.before_param_update: a hook that runs after the backward, before any parameter write.

The async loop's background weight staging relies on it (orchestration/weight_load.py): the
staging reads the weights while the next forward-backward runs and must be waited for before the
optimizer writes them.
"""

import pytest
import torch

pytest.importorskip("megatron.core")

from actor_cases import make_actor, make_batch  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    yield
    from megatron_vespo.train.parallel import destroy_parallel

    destroy_parallel(destroy_process_group=True)


def test_the_hook_sees_the_old_weights_with_gradients_ready_once_per_update_until_removed():
    actor = make_actor({}, train={})  # rollout 8, mini-batch 4: two optimizer updates
    params = [p for m in actor.model for p in m.parameters()]
    seen = []

    def hook():
        seen.append(([p.detach().clone() for p in params],
                     all(float(p.main_grad.abs().sum()) > 0 for p in params[:3])))

    batch = make_batch(actor)
    before = [p.detach().clone() for p in params]
    remove = actor.before_param_update(hook)
    metrics = actor.train_on_rollout(batch)
    assert len(seen) == len(metrics) > 1  # one call per optimizer update
    first_view, grads_ready = seen[0]
    assert grads_ready  # after the backward
    assert all(torch.equal(a, b) for a, b in zip(first_view, before))  # before the first write
    assert not all(torch.equal(a, b) for a, b in zip(seen[1][0], before))  # update 1 wrote before call 2
    remove()
    actor.train_on_rollout(batch)
    assert len(seen) == len(metrics)  # removed: not called again
