"""EPO search: the step's linear program, its fallback, the paper's toy problem, and a few steps on the digits pool."""

import json
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from mergebench_core import PRETRAINED
from mergebench_core.cli import main
from mergebench_core.results.store import ResultStore
from mergebench_core.training.loop import TrainConfig, TrainState
from mergebench_epo import EPO, Params, adjustments, epo_direction

# --- the toy problem of the EPO paper (Mahapatra & Rajan 2020; `toy_biobjective.py` of the authors) ---
# x ∈ R^20, l1 = 1 − exp(−‖x − 1/√n‖²), l2 = 1 − exp(−‖x + 1/√n‖²). The Pareto set is the segment x = u·1/√n,
# u ∈ [−1, 1], whose image l(u) = (1 − exp(−(u − 1)²), 1 − exp(−(u + 1)²)) is a concave front: l1 + l2 is largest
# in the middle (1.26 at u = 0) and smallest at the ends (0.98 at u = ±1).
N = 20
CENTER = torch.full((N,), 1 / math.sqrt(N), dtype=torch.float64)
# The start of the authors' figures (`compare_descent.py`): x0 = (0.3, −0.3, 0.3, ...). Its mean is 0, which makes it
# a point of symmetry: a uniform weighted sum, l1 + l2, then has no gradient along the front and gradient descent
# stops on the symmetric saddle u = 0 (a maximum of l1 + l2 along the front). 0.01 on the first coordinate breaks
# that tie for every method alike.
X0 = torch.tensor([0.3 if i % 2 == 0 else -0.3 for i in range(N)], dtype=torch.float64)
X0[0] += 0.01
PREFERENCES = [(0.2, 0.8), (0.35, 0.65), (0.5, 0.5), (0.65, 0.35), (0.8, 0.2)]


def toy_losses(x):
    return torch.stack([1 - torch.exp(-((x - CENTER) ** 2).sum()), 1 - torch.exp(-((x + CENTER) ** 2).sum())])


def toy_losses_and_grads(x):
    x = x.detach().requires_grad_(True)
    losses = toy_losses(x)
    grads = torch.stack([torch.autograd.grad(losses[i], x, retain_graph=True)[0] for i in range(2)])
    return losses.detach(), grads


def front(u):
    return np.array([1 - math.exp(-(u - 1) ** 2), 1 - math.exp(-(u + 1) ** 2)])


def exact_point(r):
    """The Pareto optimum on the ray r1 l1 = r2 l2: bisection on u, along which r1 l1 − r2 l2 decreases."""
    lo, hi = -1.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if r[0] * front(mid)[0] > r[1] * front(mid)[1] else (lo, mid)
    return front((lo + hi) / 2)


def on_front(losses):
    """Distance in l2 between the losses and the front point with the same l1 (0 exactly on the front)."""
    u = 1 - math.sqrt(-math.log(1 - losses[0]))
    return abs(front(u)[1] - losses[1])


def epo_loop(r, eps, steps=100, lr=0.25):
    """Plain gradient descent along −Σ_j β_j ∇l_j with β from `epo_direction`."""
    x, modes = X0.clone(), {"balance": 0, "descent": 0}
    for _ in range(steps):
        losses, grads = toy_losses_and_grads(x)
        beta, info = epo_direction(losses, grads, torch.tensor(r, dtype=torch.float64), eps)
        assert not info.fallback
        modes[info.mode] += 1
        x = x - lr * beta @ grads
    return toy_losses(x).numpy(), modes


@pytest.mark.parametrize("r", PREFERENCES)
def test_epo_ends_on_the_preference_ray_and_on_the_front(r):
    losses, modes = epo_loop(r, eps=1e-6)
    print(f"EPO r={r}: r1 l1 = {r[0] * losses[0]:.6f}, r2 l2 = {r[1] * losses[1]:.6f}, l = {losses.round(5)}, "
          f"exact ray point {exact_point(r).round(5)}, {modes}")
    assert abs(r[0] * losses[0] - r[1] * losses[1]) < 1e-3
    assert on_front(losses) < 1e-4  # Pareto optimal, not merely balanced
    assert np.abs(losses - exact_point(r)).max() < 2e-3
    if r[0] != r[1]:  # an unbalanced start: EPO first climbs along the ray (balance), then descends
        assert modes["balance"] > 0 and modes["descent"] > 0


def test_the_default_eps_stops_balancing_once_the_non_uniformity_is_below_it():
    # μ_r = KL(l̂ ‖ 1/m) ≈ 2δ² for l̂ = (1/2 + δ, 1/2 − δ): eps = 1e-4 leaves |r1 l1 − r2 l2| up to about 1e-2
    for r in PREFERENCES:
        losses, _ = epo_loop(r, eps=Params().eps)
        assert abs(r[0] * losses[0] - r[1] * losses[1]) < 1e-2 and on_front(losses) < 1e-4


def test_linear_scalarization_cannot_reach_the_concave_part_of_the_front():
    # Gradient descent on r1 l1 + r2 l2 from the same start. On a concave front a weighted sum is smallest at an end
    # of the front, never inside, so for every preference it runs to an extreme point (one loss ≈ 0, the other
    # ≈ 1 − e⁻⁴ = 0.98), far from the balanced point EPO reaches.
    ends = {}
    for r in PREFERENCES:
        x = X0.clone()
        weights = torch.tensor(r, dtype=torch.float64)
        for _ in range(300):
            losses, grads = toy_losses_and_grads(x)
            x = x - 0.25 * weights @ grads
        ends[r] = toy_losses(x).numpy()
        print(f"linear scalarization r={r}: l = {ends[r].round(5)}, r1 l1 = {r[0] * ends[r][0]:.5f}, "
              f"r2 l2 = {r[1] * ends[r][1]:.5f}")
        assert min(ends[r]) < 0.01 and max(ends[r]) > 0.97
    l_ls, l_epo, r = ends[(0.5, 0.5)], exact_point((0.5, 0.5)), (0.5, 0.5)
    assert abs(r[0] * l_ls[0] - r[1] * l_ls[1]) > 0.4  # far off the ray r1 l1 = r2 l2
    assert l_ls.sum() < l_epo.sum() - 0.25  # the balanced point (0.63, 0.63) is no minimiser of l1 + l2


def random_problem(seed, m, n=7):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(m, n, generator=g, dtype=torch.float64)
    losses = torch.rand(m, generator=g, dtype=torch.float64) + 0.05
    preference = torch.rand(m, generator=g, dtype=torch.float64) + 0.05
    return losses, grads, preference


@pytest.mark.parametrize("eps,mode", [(0.0, "balance"), (1e9, "descent")])
@pytest.mark.parametrize("seed", range(12))
def test_the_linear_program_satisfies_its_constraints(seed, eps, mode):
    m = 2 + seed % 4
    losses, grads, preference = random_problem(seed, m)
    beta, info = epo_direction(losses, grads, preference, eps)
    assert info.mode == mode
    if info.fallback:  # restricted descent can be infeasible (see below); then β is the preference
        assert mode == "descent" and "infeasible" in info.message
        assert torch.allclose(beta, preference / preference.sum())
        return
    b = beta.numpy()
    assert np.all(b >= 0) and abs(b.sum() - 1) < 1e-9
    # recompute the program's data from the definitions (C's scale changes no constraint)
    r = preference.numpy() / preference.numpy().sum()
    rl = r * losses.numpy()
    l_hat = rl / rl.sum()
    mu = float(np.sum(l_hat * np.log(m * l_hat)))
    a = r * (np.log(m * l_hat) - mu)
    C = (grads @ grads.T).numpy()
    C /= C.diagonal().max()
    assert math.isclose(info.mu, mu, rel_tol=1e-9) and np.allclose(info.adjustment, a)
    Cb, Ca, tol = C @ b, C @ a, 1e-7
    if mode == "balance":
        top = rl == rl.max()
        if np.any(Ca > 0):
            assert np.all(Cb[top] >= -tol)  # the worst-off task (largest r_j l_j) does not get worse
            rest = (Ca <= 0) & ~top
            assert np.all(Cb[rest] >= Ca[rest] - tol)
        else:
            assert np.all(Cb >= -tol)
        # β maximises βᵀCa: no vertex of the simplex that is feasible does better
        assert b @ Ca >= max((Ca[j] for j in range(m) if _balance_feasible(C, Ca, rl, j)), default=-np.inf) - tol
    else:
        assert np.all(Cb >= -tol)  # no loss increases to first order
        assert b @ Ca >= min(Ca.max(), 0.0) - tol  # and the balance is not undone


def _balance_feasible(C, Ca, rl, j):
    vertex = np.eye(len(Ca))[j]
    top = rl == rl.max()
    if np.any(Ca > 0):
        rest = (Ca <= 0) & ~top
        return bool(np.all((C @ vertex)[top] >= 0) and np.all((C @ vertex)[rest] >= Ca[rest]))
    return bool(np.all(C @ vertex >= 0))


def test_adjustments_follow_the_paper():
    rl, mu, a = adjustments(np.array([0.2, 0.6]), np.array([0.5, 0.5]))
    assert np.allclose(rl, [0.1, 0.3])
    assert math.isclose(mu, 0.25 * math.log(0.5) + 0.75 * math.log(1.5))  # KL((1/4, 3/4) ‖ (1/2, 1/2))
    assert np.allclose(a, 0.5 * (np.log([0.5, 1.5]) - mu))
    _, mu, _ = adjustments(np.array([0.3, 0.6]), np.array([2 / 3, 1 / 3]))
    assert abs(mu) < 1e-15  # on the ray: uniform


@pytest.mark.parametrize("preference,match", [
    ([], "empty"), ([0.5, -0.5], "negative"), ([0.0, 0.0], "all zeros"), ([0.5, float("nan")], "finite"),
    ([0.2, 0.3, 0.5], "3 weights for 2 tasks")])
def test_the_solver_refuses_bad_preferences(preference, match):
    losses, grads, _ = random_problem(0, 2)
    with pytest.raises(ValueError, match=match):
        epo_direction(losses, grads, torch.tensor(preference, dtype=torch.float64))


def test_the_solver_refuses_bad_losses_and_shapes():
    losses, grads, preference = random_problem(0, 2)
    with pytest.raises(ValueError, match="non-negative losses"):
        epo_direction(-losses, grads, preference)
    with pytest.raises(ValueError, match="shape"):
        epo_direction(losses, grads[:1], preference)


def test_a_zero_weight_leaves_its_task_out():
    losses, grads, _ = random_problem(3, 3)
    beta, info = epo_direction(losses, grads, [0.0, 1.0, 0.0])
    assert beta.tolist() == [0.0, 1.0, 0.0] and info.mode == "descent" and info.mu == 0.0
    beta, info = epo_direction(losses, grads, [0.0, 0.5, 0.5])
    assert beta[0] == 0.0 and info.active == (1, 2) and abs(float(beta.sum()) - 1) < 1e-9


def test_the_scale_of_the_preference_and_of_the_gradients_does_not_matter():
    losses, grads, preference = random_problem(5, 4)
    beta, _ = epo_direction(losses, grads, preference)
    assert torch.allclose(epo_direction(losses, 1e-4 * grads, 7 * preference)[0], beta, atol=1e-6)


def test_an_infeasible_program_falls_back_to_the_preference():
    # Restricted descent asks for a step that lowers no loss to first order (Cβ ≥ 0) and keeps the balance
    # (βᵀCa ≥ 0 here); with five conflicting random gradients in R^7 no β on the simplex does both.
    losses, grads, preference = random_problem(7, 5)
    beta, info = epo_direction(losses, grads, preference, eps=1e9)
    assert info.mode == "descent" and info.fallback and "infeasible" in info.message
    assert torch.allclose(beta, preference / preference.sum())
    # without the balance constraint (relaxed descent) the program is feasible: β is MGDA-like, Cβ ≥ 0
    beta, info = epo_direction(losses, grads, preference, eps=1e9, relax=True)
    assert not info.fallback and np.all(info.gram @ beta.numpy() >= -1e-7)


class Failed:
    status, x, message = 2, None, "The problem is infeasible. (forced by the test)"


def test_a_failed_program_falls_back_to_the_preference(monkeypatch):
    monkeypatch.setattr(scipy.optimize, "linprog", lambda *args, **kwargs: Failed())
    losses, grads, preference = random_problem(1, 3)
    beta, info = epo_direction(losses, grads, preference)
    assert info.fallback and "infeasible" in info.message
    assert torch.allclose(beta, preference / preference.sum())


def test_a_solver_error_falls_back_too(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("the solver broke")

    monkeypatch.setattr(scipy.optimize, "linprog", broken)
    losses, grads, preference = random_problem(2, 2)
    beta, info = epo_direction(losses, grads, preference)
    assert info.fallback and "the solver broke" in info.message
    assert torch.allclose(beta, preference / preference.sum())


def digits_step(digits_pools, preference, steps=1, monkeypatch=None):
    pool, taskpool = digits_pools
    model = pool.load_model(PRETRAINED)
    tasks = ("digits", "parity", "rot90")
    batches = {t: next(iter(taskpool.batches(t, "train", batch_size=32))) for t in tasks}
    state = TrainState(1, tasks, torch.device("cpu"), torch.Generator(), taskpool, TrainConfig(),
                       {"preference": dict(zip(tasks, preference))})
    method = EPO(Params())
    outs = [method.loss(model, batches, state) for _ in range(steps)]
    return model, taskpool, batches, state, outs


def test_the_loss_weighs_the_task_losses_by_the_epo_direction(digits_pools):
    model, taskpool, batches, state, [(loss, logged)] = digits_step(digits_pools, (0.2, 0.3, 0.5))
    tasks = list(batches)
    beta = torch.tensor([logged[f"epo/beta/{t}"] for t in tasks])
    losses = torch.tensor([logged[f"loss/train/{t}"] for t in tasks])
    assert abs(float(beta.sum()) - 1) < 1e-6 and torch.all(beta >= 0)
    assert math.isclose(float(loss.detach()), float(beta @ losses), rel_tol=1e-5)
    # the same β as the pure function, on gradients over every trainable parameter
    params = [p for p in model.parameters() if p.requires_grad]
    per_task = [torch.nn.functional.cross_entropy(taskpool.logits(model, t, x), y) for t, (x, y) in batches.items()]
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(lt, params)]) for lt in per_task])
    expected, info = epo_direction(losses, grads, [0.2, 0.3, 0.5])
    assert torch.allclose(beta, expected.float(), atol=1e-4)
    # β is a constant: the backward of the surrogate is Σ_j β_j ∇L_j
    surrogate = torch.autograd.grad(loss, params)
    assert torch.allclose(torch.cat([g.reshape(-1) for g in surrogate]), beta @ grads, atol=1e-5)
    stats = state.report["epo"]
    assert stats["balance_steps"] + stats["descent_steps"] == 1 and stats["fallbacks"] == 0
    assert stats["mu"] == logged["epo/mu"] == info.mu


def test_fallbacks_are_counted_in_the_state_and_logged(digits_pools, monkeypatch):
    monkeypatch.setattr(scipy.optimize, "linprog", lambda *args, **kwargs: Failed())
    *_, state, outs = digits_step(digits_pools, (0.2, 0.3, 0.5), steps=3)
    assert state.report["epo"]["fallbacks"] == 3
    assert [logged["epo/fallbacks"] for _, logged in outs] == [1.0, 2.0, 3.0]
    assert outs[-1][1]["epo/beta/rot90"] == pytest.approx(0.5)  # r / Σr


def test_params_reach_the_training_loop_and_eps_is_checked():
    config = EPO(Params(steps=7, lr=1e-3, schedule="cosine", grad_clip=1.0)).train_config()
    assert (config.steps, config.lr, config.schedule, config.grad_clip) == (7, 1e-3, "cosine", 1.0)
    with pytest.raises(ValueError, match="eps"):
        Params(eps=-1.0)


@pytest.fixture()
def own_trained_cache(cli_env, session_cache, monkeypatch):
    """The session's built digits pool, with an empty trained-model cache, so the cell trains."""
    cache = cli_env / "cache"
    (cache / "pools").mkdir(parents=True)
    (cache / "pools" / "digits").symlink_to(session_cache / "pools" / "digits")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    return cli_env


def test_a_few_steps_on_the_digits_pool_through_the_cli(own_trained_cache, capsys):
    argv = ["run", "-m", "epo", "-p", "digits-mlp_TA8", "--tasks", "digits,rot90", "--preference", "0.3,0.7",
            "epo.steps=5"]
    assert main(argv) == 0
    [cell] = [r for r in ResultStore(own_trained_cache / "results.sqlite").all() if r.method == "epo"]
    assert cell.status == "ok" and cell.preference == [0.3, 0.7] and cell.params["steps"] == 5
    assert set(cell.metrics) == {"digits", "rot90"} and cell.extras["trained_now"] is True
    counters = cell.extras["train"]["report"]["epo"]
    assert counters["balance_steps"] + counters["descent_steps"] == 5 and counters["fallbacks"] == 0
    capsys.readouterr()
    assert main(["show", "--method", "epo", "--curves"]) == 0
    last = next(c for c in json.loads(capsys.readouterr().out) if "training_log" in c)["training_log"]["last"]
    assert last["step"] == 5 and last["epo/balance_steps"] + last["epo/descent_steps"] == 5
    assert last["epo/fallbacks"] == 0 and {"loss/train/digits", "epo/mu", "epo/beta/rot90"} <= set(last)
