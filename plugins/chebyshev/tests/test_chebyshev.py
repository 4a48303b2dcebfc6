"""chebyshev minimises max_t r_t L_t (or its smooth version): on the EPO paper's toy problem it reaches the
Pareto optimum on each preference ray, and it trains on the digits pool through the CLI."""

import math

import numpy as np
import pytest
import torch

from mergebench_core import PRETRAINED
from mergebench_core.cli import main
from mergebench_core.results.store import ResultStore
from mergebench_core.training.loop import TrainConfig, TrainState
from mergebench_chebyshev import Chebyshev, Params, chebyshev_scalarization

# The two-objective toy problem of the EPO paper (Mahapatra & Rajan 2020): x ∈ R^20, l1 = 1 − exp(−‖x − 1/√n‖²),
# l2 = 1 − exp(−‖x + 1/√n‖²). Its Pareto front l(u) = (1 − exp(−(u − 1)²), 1 − exp(−(u + 1)²)), u ∈ [−1, 1], is
# concave. Start: the authors' x0 = (0.3, −0.3, ...) with 0.01 added to the first coordinate (x0 itself is a point
# of symmetry of the problem, see the EPO plugin's tests).
N = 20
CENTER = torch.full((N,), 1 / math.sqrt(N), dtype=torch.float64)
X0 = torch.tensor([0.3 if i % 2 == 0 else -0.3 for i in range(N)], dtype=torch.float64)
X0[0] += 0.01
PREFERENCES = [(0.2, 0.8), (0.35, 0.65), (0.5, 0.5), (0.65, 0.35), (0.8, 0.2)]


def toy_losses(x):
    return torch.stack([1 - torch.exp(-((x - CENTER) ** 2).sum()), 1 - torch.exp(-((x + CENTER) ** 2).sum())])


def front(u):
    return np.array([1 - math.exp(-(u - 1) ** 2), 1 - math.exp(-(u + 1) ** 2)])


def exact_point(r):
    """The Pareto optimum on the ray r1 l1 = r2 l2 (the point EPO search ends on): bisection along the front."""
    lo, hi = -1.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if r[0] * front(mid)[0] > r[1] * front(mid)[1] else (lo, mid)
    return front((lo + hi) / 2)


def chebyshev_loop(r, smooth, steps=300, lr=0.5, decay=0.98):
    """Plain (sub)gradient descent on the scalarization, with a geometrically decaying step: with a constant step
    the plain max zig-zags across the ray, one task's gradient at a time."""
    x = X0.clone()
    for k in range(steps):
        x.requires_grad_(True)
        objective = chebyshev_scalarization(toy_losses(x), r, smooth=smooth)
        (grad,) = torch.autograd.grad(objective, x)
        x = (x - lr * decay**k * grad).detach()
    return toy_losses(x).numpy()


@pytest.mark.parametrize("r", PREFERENCES)
def test_the_max_reaches_the_pareto_optimum_on_the_preference_ray(r):
    losses = chebyshev_loop(r, smooth=0.0)
    print(f"chebyshev r={r}: r1 l1 = {r[0] * losses[0]:.6f}, r2 l2 = {r[1] * losses[1]:.6f}, l = {losses.round(5)}")
    assert abs(r[0] * losses[0] - r[1] * losses[1]) < 1e-3
    assert np.abs(losses - exact_point(r)).max() < 2e-3  # the point EPO reaches (its tests check the same bound)


@pytest.mark.parametrize("mu", [1e-2, 1e-3])
def test_the_smooth_version_lands_within_order_mu_of_the_ray(mu):
    # The smooth optimum balances the softmax weights of r ⊙ l / μ against the front's slope, so it leaves the ray
    # by r1 l1 − r2 l2 = μ log(w1 / w2): about 2.3 μ at r = (0.2, 0.8) on this front, 0 at r = (0.5, 0.5).
    for r in PREFERENCES:
        losses = chebyshev_loop(r, smooth=mu, steps=500)
        print(f"smooth chebyshev μ={mu} r={r}: r1 l1 − r2 l2 = {r[0] * losses[0] - r[1] * losses[1]:+.5f}")
        assert abs(r[0] * losses[0] - r[1] * losses[1]) < 3 * mu
        assert np.abs(losses - exact_point(r)).max() < 5 * mu


def test_the_scalarization():
    losses = torch.tensor([0.5, 2.0, 1.0])
    r = [0.5, 0.2, 0.3]
    assert float(chebyshev_scalarization(losses, r)) == pytest.approx(0.4)
    assert float(chebyshev_scalarization(losses, r, reference=torch.tensor([0.0, 1.5, 0.0]))) == pytest.approx(0.3)
    smooth = float(chebyshev_scalarization(losses, r, smooth=0.1))
    assert smooth == pytest.approx(0.1 * math.log(sum(math.exp(v / 0.1) for v in (0.25, 0.4, 0.3))))
    assert 0.4 <= smooth <= 0.4 + 0.1 * math.log(3)  # max ≤ smooth ≤ max + μ log m
    with pytest.raises(ValueError, match="shape"):
        chebyshev_scalarization(losses, [0.5, 0.5])


def digits_loss(digits_pools, preference, params=None, state_out=None):
    pool, taskpool = digits_pools
    model = pool.load_model(PRETRAINED)
    tasks = ("digits", "parity")
    batches = {t: next(iter(taskpool.batches(t, "train", batch_size=32))) for t in tasks}
    losses = {t: torch.nn.functional.cross_entropy(taskpool.logits(model, t, x), y) for t, (x, y) in batches.items()}
    state = TrainState(1, tasks, torch.device("cpu"), torch.Generator(), taskpool, TrainConfig(),
                       {"preference": dict(zip(tasks, preference)) if preference else None, "modelpool": pool})
    if state_out is not None:
        state_out.append(state)
    return model, losses, Chebyshev(params or Params()).loss(model, batches, state)


def test_the_experts_reference_subtracts_each_experts_train_loss(digits_pools):
    pool, taskpool = digits_pools
    states = []
    _, losses, (loss, _) = digits_loss(digits_pools, (0.4, 0.6), Params(reference="experts",
                                                                       reference_examples=100), states)
    z = {}
    for task in ("digits", "parity"):  # independently: the expert's mean cross-entropy on its first 100 examples
        x, y = next(iter(taskpool.batches(task, "train", batch_size=100)))
        with torch.no_grad():
            z[task] = float(torch.nn.functional.cross_entropy(taskpool.logits(pool.load_model(task), task, x), y))
    assert states[0].report["reference"] == pytest.approx(z, rel=1e-5)
    expected = torch.maximum(0.4 * (losses["digits"] - z["digits"]), 0.6 * (losses["parity"] - z["parity"]))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_the_loss_is_the_largest_weighted_task_loss(digits_pools):
    model, losses, (loss, logged) = digits_loss(digits_pools, (0.3, 0.7))
    weighted = {"digits": 0.3 * losses["digits"], "parity": 0.7 * losses["parity"]}
    top = max(weighted, key=lambda t: float(weighted[t].detach()))
    assert torch.allclose(loss, weighted[top])
    assert logged["loss/train/parity"] == pytest.approx(float(losses["parity"].detach()))
    # the gradient flows through the worst-off task only
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True)
    want = torch.autograd.grad(weighted[top], params)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))


def test_without_a_preference_the_tasks_weigh_the_same_and_smooth_is_a_soft_max(digits_pools):
    _, losses, (loss, _) = digits_loss(digits_pools, None)
    assert torch.allclose(loss, torch.maximum(losses["digits"], losses["parity"]) / 2)
    _, losses, (loss, _) = digits_loss(digits_pools, None, Params(smooth=0.05))
    expected = 0.05 * torch.logsumexp(torch.stack([losses["digits"], losses["parity"]]) / 2 / 0.05, 0)
    assert torch.allclose(loss, expected)


def test_params():
    config = Chebyshev(Params(steps=7, lr=1e-3, warmup_steps=2)).train_config()
    assert (config.steps, config.lr, config.warmup_steps) == (7, 1e-3, 2)
    with pytest.raises(ValueError, match="reference must be one of zero, experts"):
        Params(reference="ideal")
    with pytest.raises(ValueError, match="smooth"):
        Params(smooth=-0.1)


@pytest.fixture()
def own_trained_cache(cli_env, session_cache, monkeypatch):
    """The session's built digits pool, with an empty trained-model cache, so the cells train."""
    cache = cli_env / "cache"
    (cache / "pools").mkdir(parents=True)
    (cache / "pools" / "digits").symlink_to(session_cache / "pools" / "digits")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    return cli_env


def test_a_few_steps_on_the_digits_pool_through_the_cli(own_trained_cache, capsys):
    argv = ["run", "-m", "chebyshev", "-p", "digits-mlp_TA8", "--tasks", "digits,rot90", "--preference", "0.3,0.7",
            "chebyshev.steps=5", "chebyshev.smooth=0,0.1"]
    assert main(argv) == 0
    cells = [r for r in ResultStore(own_trained_cache / "results.sqlite").all() if r.method == "chebyshev"]
    assert sorted(c.params["smooth"] for c in cells) == [0.0, 0.1]
    for cell in cells:
        assert cell.status == "ok" and cell.preference == [0.3, 0.7] and cell.params["steps"] == 5
        assert set(cell.metrics) == {"digits", "rot90"} and cell.extras["trained_now"] is True
    # the smooth and the plain objective are two recipes: two trained models
    assert len(list((own_trained_cache / "cache" / "trained" / "chebyshev").glob("*.safetensors"))) == 2
    assert main([*argv[:-1], "chebyshev.reference=nadir"]) == 2
    assert "reference must be one of zero, experts" in capsys.readouterr().err
