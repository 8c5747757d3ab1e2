import copy
from dataclasses import replace
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.budgets import Budget
from prunekit.data import Loader, load_dataset
from prunekit.errors import PrunekitError
from prunekit.cost import CostMeter
from prunekit.fisher import GradientMatrix, WeightLayout
from prunekit.methods import PruneContext
from prunekit.methods._chita_solvers import (
    Blocks,
    Columns,
    FullFits,
    NearbyRefits,
    Pools,
    Quadratic,
    active_set_iht,
    iterate_at,
    refit_pursuit,
    ridge_solve,
)
from prunekit.methods import _chita_solvers as chita_solvers
from prunekit.methods import chita as chita_module
from prunekit.methods.chita import RIDGE_PATH, ChitaHparams, solve
from prunekit.models import create_model_for
from prunekit.targets import find_targets
from prunekit.training import TrainConfig, Trainer, evaluate


def random_problem(n, p, seed=0, linear=False):
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(n, p, generator=generator, dtype=torch.float64)
    anchor = torch.randn(p, generator=generator, dtype=torch.float64)
    alpha = torch.randn(p, generator=generator, dtype=torch.float64) if linear else None
    return Quadratic.on_columns(g, anchor, 0.05, alpha)


def brute_force_refit(q, support):
    """argmin f over w supported on `support`, with the p×p Hessian written out."""
    kept = support.nonzero().squeeze(1)
    hessian = q.g.T @ q.g + 2 * q.ridge * torch.eye(q.g.shape[1], dtype=torch.float64)
    # f(w) = ½ wᵀHw − bᵀw + const with b = (GᵀG + 2λ'I) w̄ − α
    b = hessian @ q.anchor - (0 if q.linear is None else q.linear)
    w = torch.zeros_like(q.anchor)
    w[kept] = torch.linalg.solve(hessian[kept][:, kept], b[kept])
    return w


@pytest.mark.parametrize("n, m", [(30, 10), (10, 30)])  # direct and Woodbury
def test_ridge_solve_equals_a_direct_solve(n, m):
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, m, generator=generator, dtype=torch.float64), torch.randn(m, generator=generator,
                                                                                      dtype=torch.float64)
    expected = torch.linalg.solve(a.T @ a + 0.3 * torch.eye(m, dtype=torch.float64), b)
    torch.testing.assert_close(ridge_solve(a, b, 0.3), expected)


def test_float64_products_of_float32_columns_chunk_by_chunk_equal_those_of_a_float64_copy(monkeypatch):
    monkeypatch.setattr(chita_solvers, "FLOAT64_COLUMNS", 7)  # several chunks, the last one short
    generator = torch.Generator().manual_seed(3)
    g = torch.randn(6, 40, generator=generator)
    columns = torch.randperm(40, generator=generator)[:23]
    copy64 = g[:, columns].to(torch.float64)
    a = Columns(g, columns)
    v, u = torch.randn(23, dtype=torch.float64, generator=generator), torch.randn(6, dtype=torch.float64,
                                                                                   generator=generator)
    torch.testing.assert_close(a.gram(), copy64 @ copy64.T)
    torch.testing.assert_close(a.times(v), copy64 @ v)
    torch.testing.assert_close(a.transposed_times(u), copy64.T @ u)
    torch.testing.assert_close(ridge_solve(a, v, 0.3), ridge_solve(copy64, v, 0.3))


@pytest.mark.parametrize("kept", [5, 25])  # fewer and more kept weights than gradients
@pytest.mark.parametrize("linear", [False, True])
def test_refit_is_the_exact_minimiser_on_its_support(kept, linear):
    q = random_problem(12, 40, linear=linear)
    support = torch.zeros(40, dtype=torch.bool)
    support[torch.randperm(40, generator=torch.Generator().manual_seed(2))[:kept]] = True
    w = q.refit(support)
    torch.testing.assert_close(w, brute_force_refit(q, support))
    assert (w[~support] == 0).all()
    assert q.gradient(w, q.residual(w))[support].abs().max() < 1e-8


def test_restricted_problem_has_the_full_objective():
    q = random_problem(8, 30, linear=True)
    columns = torch.arange(0, 30, 3)
    w = torch.zeros(30, dtype=torch.float64)
    w[columns] = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert q.restrict(columns).value(w[columns]) == pytest.approx(q.value(w), rel=1e-12)


def planted_problem():
    """A k-sparse w* with G(w̄ − w*) = 0, where w̄'s largest entries are mostly off w*'s support."""
    generator = torch.Generator().manual_seed(0)
    n, p, k = 40, 120, 6
    g = torch.randn(n, p, generator=generator, dtype=torch.float64)
    truth = torch.zeros(p, dtype=torch.float64)
    truth[torch.randperm(p, generator=generator)[:k]] = 1 + torch.rand(k, generator=generator, dtype=torch.float64)
    null_space = torch.linalg.svd(g).Vh[n:].T
    drift = null_space @ torch.randn(p - n, generator=generator, dtype=torch.float64)
    return Quadratic.on_columns(g, truth + 3 * drift / drift.abs().max(), 1e-6), truth != 0, k


def test_iht_recovers_a_planted_support_where_magnitude_fails_and_never_increases_the_objective():
    q, truth, k = planted_problem()
    pools = Pools(torch.zeros(len(truth), dtype=torch.long), [k])
    magnitude = pools.top(q.anchor)
    assert (magnitude & truth).sum() <= 2
    trace = []
    found = active_set_iht(q, pools, iterate_at(q, q.anchor * magnitude, magnitude), pools.widened(q.anchor, 1.5),
                           iterations=200, rounds=10, tolerance=1e-10, lipschitz=q.lipschitz(torch.Generator()),
                           trace=trace)
    assert torch.equal(found.support, truth)
    assert q.value(q.refit(found.support)) < 1e-3 < q.value(q.refit(magnitude))
    assert all(b <= a for a, b in itertools.pairwise(trace)) and len(trace) > 10


def test_refit_pursuit_swaps_from_the_magnitude_support_to_the_planted_one():
    q, truth, k = planted_problem()
    pools = Pools(torch.zeros(len(truth), dtype=torch.long), [k])
    trace = []
    found = refit_pursuit(FullFits(q, k), pools, pools.top(q.anchor), rounds=10, trace=trace)
    assert torch.equal(found.support, truth)
    assert trace[0] == pytest.approx(q.value(q.refit(pools.top(q.anchor))))
    assert all(b < a for a, b in itertools.pairwise(trace)) and found.value < 1e-3
    assert torch.equal(refit_pursuit(FullFits(q, k), pools, truth, rounds=10, trace=[]).support, truth)  # fixed point


def test_blocks_fit_each_block_as_its_own_backsolve_and_their_values_add_up():
    q = random_problem(10, 30, linear=True)
    blocks = Blocks.of_columns(q.g, q.anchor, 12, q.ridge, q.linear)  # 12, 12 and 6 weights (6 of padding)
    assert blocks.hessian.shape == (3, 12, 12) and int(blocks.present.sum()) == 30
    support = q.anchor.abs() > 0.8
    kept = torch.zeros(blocks.present.shape, dtype=torch.bool)
    kept[blocks.present] = support
    w, value = blocks.fit(kept)
    parts = [slice(0, 12), slice(12, 24), slice(24, 30)]
    for i, columns in enumerate(parts):
        part = Quadratic.on_columns(q.g[:, columns], q.anchor[columns], q.ridge, q.linear[columns])
        expected = part.refit(support[columns])
        torch.testing.assert_close(w[i, :columns.stop - columns.start], expected)
        assert float(value[i]) == pytest.approx(part.value(expected), rel=1e-10)
    assert (w[~blocks.present] == 0).all()
    assert blocks.gradient(w)[kept].abs().max() < 1e-8  # a refit: stationary on its support


def test_one_block_is_the_backsolve():
    q = random_problem(10, 30)
    support = q.anchor.abs() > 0.8
    w, _ = Blocks.of_columns(q.g, q.anchor, 30, q.ridge).fit(support.unsqueeze(0))
    torch.testing.assert_close(w[0], q.refit(support))


def test_block_pursuit_finds_planted_supports_in_every_block_and_never_raises_a_block():
    first, truth_a, k = planted_problem()
    second, truth_b, _ = planted_problem()
    g = torch.block_diag(first.g, second.g)  # a truly block-diagonal Fisher: the block model is exact
    anchor = torch.cat([first.anchor, 0.5 * second.anchor])
    blocks = Blocks.of_columns(g, anchor, len(truth_a), first.ridge)
    start = blocks.select(blocks.anchor, torch.tensor([k, k]))
    _, start_value = blocks.fit(start)
    w, found, value = blocks.pursuit(start, rounds=10)
    assert torch.equal(blocks.flat(found), torch.cat([truth_a, truth_b]))
    assert (value <= start_value).all() and (value < 1e-3).all()
    assert torch.equal(found.sum(1), start.sum(1))  # each block keeps its count
    assert torch.equal(blocks.pursuit(found, rounds=10)[1], found)  # a fixed point


def test_block_saliency_is_the_rise_in_f_when_that_weight_alone_is_pruned():
    q = random_problem(10, 24, seed=3)
    blocks = Blocks.of_columns(q.g, q.anchor, 8, q.ridge)  # 3 blocks of 8
    saliency, = blocks.saliencies([blocks.ridge])
    everything = blocks.present.clone()
    for i in range(8):
        kept = everything.clone()
        kept[:, i] = False
        _, value = blocks.fit(kept)  # the others refitted: OBS's compensating update, exactly
        torch.testing.assert_close(saliency[:, i], value)


def test_the_block_solver_starts_from_the_saliency_allocation_where_magnitude_prunes_what_matters():
    """Planted: half the inputs barely vary, and their weights are ten times the others'. Magnitude keeps those
    and prunes the inputs the outputs depend on; OBS's saliency, from the same Fisher, keeps the right half."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0] * 4 + [0.1] * 4, [-1.0] * 4 + [0.1, -0.1, 0.1, -0.1]]))
    spread = torch.tensor([0.01] * 4 + [10.0] * 4)
    batches = [(torch.randn(16, 8) * spread, torch.zeros(16)) for _ in range(8)]
    matters = torch.tensor([False] * 4 + [True] * 4).expand(2, 8)
    assert torch.equal(prunekit.prune(copy.deepcopy(model), "magnitude", 0.5).masks["weight"], ~matters)
    for settings in ({}, {"holdout": 0, "ridge": 1e-3, "first_order": False}):  # chosen held out, and fixed
        result = prunekit.prune(copy.deepcopy(model), "chita", 0.5, batches, loss="distill", solver="block",
                                block_size=4, fisher_samples=32, **settings)
        assert torch.equal(result.masks["weight"], matters), settings


def planted_context(p, sparsity):
    """What `solve` needs of a prune: a p-weight model's one target under a global budget."""
    model = torch.nn.Linear(p, 1, bias=False)
    targets = find_targets(model)[0]
    return PruneContext(model, targets, sparsity, Budget("global"), None, 0, CostMeter(model)), WeightLayout.of(targets)


class QuadraticHeldOut:
    """A held-out loss known in closed form: the mean of ½((w̄ − w)·x)² over held-out gradient rows x."""

    def __init__(self, rows, anchor):
        self.quadratic, self.count = Quadratic.on_columns(rows, anchor, 0.0), len(rows)

    def loss(self, w):
        return self.quadratic.value(w) / self.count


def low_rank_gradients(generator, count, mix, noise):
    return torch.randn(count, mix.shape[0], generator=generator, dtype=torch.float64) @ mix + noise * torch.randn(
        count, mix.shape[1], generator=generator, dtype=torch.float64)


def test_ridge_auto_picks_the_ridge_the_held_out_examples_prefer():
    """Planted: 30 noisy gradients of a rank-5 curvature over 40 weights, and 2,000 fresh ones held out. The
    smallest ridges fit the noise and the largest forgo the compensation, so the held-out loss is lowest
    inside the path (at 0.1 of G's scale), and that is the one chosen."""
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    sample, held = (low_rank_gradients(generator, count, mix, 0.3) for count in (30, 2000))
    anchor = torch.randn(40, generator=generator, dtype=torch.float64)
    ctx, layout = planted_context(40, 0.5)
    g = GradientMatrix(sample, layout)
    held_out = QuadraticHeldOut(held, anchor)
    hp = ChitaHparams(first_order=False, solver="iht")  # ridge="auto"
    solved = solve(ctx, hp, g, anchor, 0.5, held_out)

    scale = float(sample.norm()) ** 2 / (30 * 40)
    ridges = [factor * scale for factor in RIDGE_PATH]
    magnitude = Pools(torch.zeros(40, dtype=torch.long), [20]).top(anchor)
    losses = [held_out.loss(w) for w in Quadratic.on_columns(sample, anchor, 1.0).refit_path(
        magnitude, [ridge * 30 / 2 for ridge in ridges])]
    best = losses.index(min(losses))
    assert 0 < best < len(ridges) - 1 and losses[best] < 0.97 * min(losses[best - 1], losses[best + 1])  # planted
    assert solved.model.ridge == pytest.approx(ridges[best])
    assert not solved.safeguard and solved.held_out <= min(losses) + 1e-12  # the search only improved on it


def test_a_stage_returns_the_magnitude_backsolve_when_it_does_better_held_out():
    q, truth, k = planted_problem()
    p = len(truth)
    ctx, layout = planted_context(p, 1 - k / p)
    g = GradientMatrix(q.g, layout)
    hp = ChitaHparams(ridge=2 * q.ridge / g.n, first_order=False, solver="iht")
    magnitude = Pools(torch.zeros(p, dtype=torch.long), [k]).top(q.anchor)
    backsolve = q.refit(magnitude)

    # Held-out examples that agree with the Fisher: the solver's planted support is kept.
    solved = solve(ctx, hp, g, q.anchor, 1 - k / p, QuadraticHeldOut(q.g, q.anchor))
    assert torch.equal(solved.solution.support, truth) and not solved.safeguard

    # Held-out examples that only the backsolve on the magnitude support fits: that is what the stage returns.
    class PrefersBacksolve:
        def loss(self, w):
            return float((w - backsolve).norm())

    solved = solve(ctx, hp, g, q.anchor, 1 - k / p, PrefersBacksolve())
    assert solved.safeguard and solved.held_out == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(solved.solution.support, magnitude)
    torch.testing.assert_close(solved.solution.w, backsolve)


def test_the_papers_step_is_the_ihts_own_weights_under_the_first_order_model_at_the_smallest_ridge():
    q, truth, k = planted_problem()
    p = len(truth)
    ctx, layout = planted_context(p, 1 - k / p)
    rows = q.g.to(torch.float32)
    g = GradientMatrix(rows, layout)
    solved = solve(ctx, ChitaHparams(solver="iht"), g, q.anchor.to(torch.float32), 1 - k / p, None, paper=True)
    scale = float(rows.norm()) ** 2 / (g.n * p)
    assert solved.model.first_order and solved.model.ridge == pytest.approx(min(RIDGE_PATH) * scale)
    assert solved.held_out is None and not solved.safeguard
    support = solved.solution.support
    assert int(support.sum()) == k
    quadratic = Quadratic.on_columns(rows, q.anchor, solved.model.ridge * g.n / 2, g.gradient_sum() / g.batch)
    assert not torch.allclose(solved.solution.w, quadratic.refit(support), atol=1e-4)  # not refitted


def test_chita_plus_plus_takes_the_papers_step_before_its_last_stage_with_the_iht_solver(tiny_net, tiny_batches):
    result = prunekit.prune(copy.deepcopy(tiny_net), "chita++", 0.8, tiny_batches, fisher_samples=16, stages=3,
                            holdout=16)
    stages = [event for event in result.history if "stage" in event]
    assert [event["paper"] for event in stages] == [True, True, False]
    assert all(event["first_order"] and event["held_out"] is None for event in stages[:-1])
    assert stages[-1]["held_out"] > 0
    chosen = prunekit.prune(copy.deepcopy(tiny_net), "chita++", 0.8, tiny_batches, fisher_samples=16, stages=3,
                            holdout=16, solver="backsolve")
    assert not any(event["paper"] for event in chosen.history if "stage" in event)  # auto: iht only
    with pytest.raises(PrunekitError, match="--intermediate paper takes the iht solver's own weights"):
        prunekit.prune(tiny_net, "chita++", 0.8, Unreadable(), solver="block", intermediate="paper")


def test_the_stages_record_the_ridge_and_the_held_out_check(tiny_net, tiny_batches):
    result = prunekit.prune(copy.deepcopy(tiny_net), "chita++", 0.8, tiny_batches, fisher_samples=16, stages=2,
                            holdout=16, intermediate="chosen")
    stages = [event for event in result.history if "stage" in event]
    assert all(event["ridge"] > 0 and event["held_out"] > 0 and event["safeguard"] in (True, False)
               and event["first_order"] in (True, False) for event in stages)
    fixed = prunekit.prune(copy.deepcopy(tiny_net), "chita++", 0.8, tiny_batches, fisher_samples=16, stages=2,
                           ridge=3e-3)
    assert [event["ridge"] for event in fixed.history if "stage" in event] == [3e-3, 3e-3]  # a number is used as is


def test_pools_follow_the_budget_counts():
    layout = WeightLayout(("a", "b"), (torch.Size([10]), torch.Size([30])))
    values = torch.linspace(1, 2, 40)

    def top(budget):
        return Pools.from_plan(budget.plan(dict(zip(layout.names, layout.shapes)), 0.5), layout).top(values)

    assert top(Budget("global")).nonzero().min() == 20
    uniform = top(Budget("uniform"))
    assert uniform[:10].sum() == 5 and uniform[10:].sum() == 15
    override = top(Budget("global", layer_sparsity={"a": 0.0}))
    assert override[:10].all() and override[10:].sum() == 15  # the rest share the model sparsity


@pytest.mark.parametrize("seed", range(5))
def test_support_change_step_is_where_the_hard_threshold_first_changes(seed):
    generator = torch.Generator().manual_seed(seed)
    pools = Pools(torch.tensor([0] * 20 + [1] * 10), [6, 3])
    w = torch.randn(30, generator=generator, dtype=torch.float64)
    support = pools.top(w)
    w = w * support
    g = torch.randn(30, generator=generator, dtype=torch.float64)
    step = pools.support_change_step(w, g, support)
    assert 0 < step < float("inf")
    assert torch.equal(pools.top(w - step * (1 - 1e-6) * g), support)
    assert not torch.equal(pools.top(w - step * (1 + 1e-6) * g), support)


# ---------------------------------------------------------------- through prunekit.prune


@pytest.mark.parametrize("solver", ["iht", "backsolve", "block"])
@pytest.mark.parametrize("budget", ["global", "uniform"])
def test_exact_sparsity_and_solved_weights(tiny_net, tiny_batches, solver, budget):
    original = {t.name: t.weight.detach().clone() for t in find_targets(tiny_net)[0]}
    result = prunekit.prune(tiny_net, "chita", 0.7, tiny_batches, budget=budget, fisher_samples=32, solver=solver,
                            block_size=50)
    total = sum(m.numel() for m in result.masks.values())
    if budget == "global":
        assert sum(int((~m).sum()) for m in result.masks.values()) == round(0.7 * total)
    else:
        assert all(layer.achieved == pytest.approx(layer.requested) for layer in result.layers)
    targets = find_targets(tiny_net)[0]
    assert all((t.weight[~result.masks[t.name]] == 0).all() for t in targets)
    moved = [not torch.allclose(t.weight[result.masks[t.name]], original[t.name][result.masks[t.name]])
             for t in targets]
    assert all(moved)  # every layer's kept weights are the solver's, not the originals
    objective = result.history[-1]["objective"]
    assert len(objective) >= 2 and objective[-1] < objective[0]  # below magnitude pruning without an update
    assert result.cost.backward_examples == 32


def test_the_block_solver_gives_the_same_from_g_in_one_group_g_by_tensor_and_hessians_summed_row_by_row(
        tiny_net, tiny_batches, monkeypatch):
    # float64: the routes sum the same products in different orders, which float32 rounding would tell apart
    settings = dict(solver="block", block_size=20, fisher_samples=24, holdout=24, seed=0, precision="float64")
    tensors = len(find_targets(tiny_net)[0])
    assert tensors > 1
    runs = {}
    for route in ("one group", "by tensor", "summed"):
        with monkeypatch.context() as patch:
            patch.setattr(chita_module, "accumulates", lambda hp, summed=route == "summed": summed)
            if route == "by tensor":
                patch.setattr(chita_module, "streamed_groups", lambda targets, *_: [[i] for i in range(len(targets))])
            model = copy.deepcopy(tiny_net)
            runs[route] = model, prunekit.prune(model, "chita", 0.7, tiny_batches, **settings)
    reference, whole = runs["one group"]
    for route, (model, result) in runs.items():
        for name, mask in whole.masks.items():
            assert torch.equal(result.masks[name], mask), (route, name)
        for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{route}: {name}", rtol=1e-4, atol=1e-6)
    # G once for every pass when it fits as one group, and the Hessians summed from one computation of its rows;
    # by tensor, each tensor's G once a pass (three: backsolves on the magnitude and the saliency supports, then
    # the pursuit)
    assert whole.cost.backward_examples == runs["summed"][1].cost.backward_examples == 24
    assert runs["by tensor"][1].cost.backward_examples == 3 * tensors * 24
    assert whole.history[-1]["objective"][-1] < whole.history[-1]["objective"][0]


def test_the_memory_planner_counts_what_each_route_of_the_block_solver_holds(tiny_net, tiny_batches):
    # blocks as wide as n or wider: G a group of tensors at a time
    with pytest.raises(PrunekitError, match=r"chita \(block solver, n=100000, .*G of one group of tensors"):
        prunekit.prune(tiny_net, "chita", 0.7, tiny_batches, solver="block", fisher_samples=100_000,
                       block_size=100_000, max_memory=0.01)
    # narrower blocks: their Hessians, summed (tiny here: each tensor one block)
    with pytest.raises(PrunekitError, match=r"chita \(block solver, n=100000, .*block Hessians 0\.00, .*lower "
                                            r"--block-size or --precision float32"):
        prunekit.prune(tiny_net, "chita", 0.7, tiny_batches, solver="block", fisher_samples=100_000,
                       block_size=1000, max_memory=1e-5)


def test_iht_objective_never_increases_through_prune(tiny_net, tiny_batches):
    result = prunekit.prune(tiny_net, "chita", 0.8, tiny_batches, fisher_samples=16, first_order=True)
    objective = result.history[-1]["objective"]
    assert len(objective) > 2 and all(b <= a for a, b in itertools.pairwise(objective))


@pytest.mark.parametrize("solver", ["iht", "backsolve"])
def test_the_objective_trace_is_the_quadratic_at_magnitude_and_at_the_result(tiny_net, tiny_batches, solver):
    dense = copy.deepcopy(tiny_net)
    result = prunekit.prune(tiny_net, "chita", 0.7, tiny_batches, fisher_samples=32, fisher_batch=1, solver=solver,
                            ridge=1e-4, first_order=False, holdout=0)  # the solver's weights, no held-out check
    targets = find_targets(dense)[0]
    dense.eval()  # the Fisher's per-example gradients are the eval-mode network's (batch-norm statistics fixed)
    examples = zip(torch.cat([x for x, _ in tiny_batches[:2]]), torch.cat([y for _, y in tiny_batches[:2]]))
    g = torch.stack([torch.cat([grad.flatten() for grad in torch.autograd.grad(
        F.cross_entropy(dense(x[None]), y[None]), [t.weight for t in targets])]) for x, y in examples]).double()
    anchor = torch.cat([t.weight.detach().flatten() for t in targets]).double()
    # f(w) = ½ (w̄ − w)ᵀ (GᵀG + nλ I) (w̄ − w), the Hessian written out as in brute_force_refit
    hessian = g.T @ g + len(g) * result.hparams["ridge"] * torch.eye(len(anchor), dtype=torch.float64)

    def f(w):
        return float(0.5 * (anchor - w) @ hessian @ (anchor - w))

    magnitude = prunekit.prune(copy.deepcopy(dense), "magnitude", 0.7).masks
    start = anchor * torch.cat([magnitude[t.name].flatten() for t in targets])
    solved = torch.cat([t.weight.detach().flatten() for t in find_targets(tiny_net)[0]]).double()
    objective = result.history[-1]["objective"]
    assert objective[0] == pytest.approx(f(start), rel=1e-6)
    assert objective[-1] == pytest.approx(f(solved), rel=1e-6)


def test_same_seed_same_masks(tiny_net, tiny_batches):
    twin = copy.deepcopy(tiny_net)
    a = prunekit.prune(tiny_net, "chita", 0.6, tiny_batches, fisher_samples=16).masks
    b = prunekit.prune(twin, "chita", 0.6, tiny_batches, fisher_samples=16).masks
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_chita_plus_plus_recomputes_the_fisher_at_every_stage(tiny_net, tiny_batches):
    result = prunekit.prune(tiny_net, "chita++", 0.8, tiny_batches * 4, fisher_samples=16, stages=4,
                            schedule="linear", base=0.2, solver="backsolve")
    stages = [event for event in result.history if "stage" in event]
    assert [event["scheduled"] for event in stages] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [event["sparsity"] for event in stages] == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=1e-3)
    assert result.cost.backward_examples == 4 * 16
    assert result.sparsity == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("solver", ["auto", "backsolve", "block"])
def test_structured_budgets_need_a_backsolve(tiny_net, tiny_batches, solver):
    with pytest.raises(PrunekitError, match="--solver backsolve"):
        prunekit.prune(tiny_net, "chita", 0.5, Unreadable(), structure="filters", fisher_samples=8, solver="iht")
    result = prunekit.prune(tiny_net, "chita", 0.5, tiny_batches, structure="filters", fisher_samples=8,
                            solver=solver, block_size=50)  # the block solver's pursuit stays off: filters
    assert result.history[-1]["solver"] == ("backsolve" if solver == "auto" else solver)
    rows = [mask.reshape(mask.shape[0], -1) for mask in result.masks.values()]
    assert all((r.all(1) | ~r.any(1)).all() for r in rows)  # whole filters
    assert sum(int(r.all(1).sum()) for r in rows) == 20 - 10  # 8 + 8 + 4 filters, half of them kept


def test_auto_settings_take_the_whole_g_where_it_fits_else_the_widest_blocks_that_fit(tiny_net, tiny_batches):
    settings = {"fisher_samples": 48, "holdout": 16}
    roomy = prunekit.prune(copy.deepcopy(tiny_net), "chita", 0.5, tiny_batches, **settings)
    assert {(event["solver"], event["block_size"]) for event in roomy.history} == {("iht", 500)}

    targets = find_targets(tiny_net)[0]
    ctx = PruneContext(tiny_net, targets, 0.5, Budget("global"), tiny_batches, 0, CostMeter(tiny_net))
    hp = ChitaHparams(**settings)

    def needed(**concrete):
        return chita_module._memory_plan(ctx, replace(hp, **concrete), 0.5).needed / 2**30

    # a budget below G's plan, just above the blocks' at 32 (narrower than n: their Hessians are summed)
    budget = needed(solver="block", block_size=32) * 1.001
    assert budget < needed(solver="iht", block_size=500)
    widest = next(size for size in chita_module.BLOCK_SIZES if needed(solver="block", block_size=size) <= budget)
    tight = prunekit.prune(copy.deepcopy(tiny_net), "chita", 0.5, tiny_batches, max_memory=budget, **settings)
    assert {(event["solver"], event["block_size"]) for event in tight.history} == {("block", widest)}
    assert tight.cost.planned_memory_bytes <= budget * 2**30
    assert tight.sparsity == pytest.approx(0.5, abs=1e-3)


class Unreadable:
    """Data that must not be touched: the checks have to come first."""

    def __iter__(self):
        raise AssertionError("the data was read before the inputs were checked")


@pytest.mark.parametrize("hparams, message", [
    ({"fisher_samples": 0}, r"fisher_samples=0 is invalid: set it to an integer >= 1 \(--fisher-samples\)"),
    ({"ridge": 0.0}, r"ridge=0.0 is invalid: set it to auto or a finite number > 0 \(--ridge\)"),
    ({"ridge": -1e-3}, r"ridge=-0.001 is invalid: set it to auto or a finite number > 0"),
    ({"ridge": "often"}, r"ridge='often' is invalid: set it to auto or a finite number > 0"),
    ({"holdout": 0}, r"--ridge auto and --first-order auto choose on held-out examples but --holdout is 0; "
                     r"raise --holdout, or set a numeric --ridge and --first-order true or false"),
    ({"first_order": "maybe"}, r"first_order='maybe' is invalid: set it to auto, true or false"),
    ({"solver": "cg"}, r"solver='cg' is invalid: set it to one of auto, iht, backsolve, block"),
    ({"block_size": 0}, r"block_size=0 is invalid: set it to auto or an integer >= 1"),
    ({"pursuit_rounds": -1}, r"pursuit_rounds=-1 is invalid: set it to an integer >= 0"),
    ({"max_memory": 1e-6}, r"chita would need about .* GiB with the iht solver and .* GiB with the block solver at "
                           r"blocks of 1, above --max-memory 1e-06; lower --fisher-samples \(n=1000\), prune fewer "
                           r"tensors \(--exclude\), or raise --max-memory"),
    ({"max_memory": 1e-6, "solver": "iht"}, r"needs? about .* GiB, above --max-memory 1e-06 \(.*\); lower "
                                            r"--fisher-samples \(n=1000\)"),
])
def test_bad_inputs_are_refused_before_any_work(tiny_net, hparams, message):
    with pytest.raises(PrunekitError, match=message):
        prunekit.prune(tiny_net, "chita", 0.5, Unreadable(), **hparams)


def loss_out_of_reach(model, batch):
    """A loss that does not depend on the weights, as a frozen model (its outputs detached) gives."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs).detach(), labels)


@pytest.mark.parametrize("method, hparams", [
    ("chita", {"ridge": 1e-3, "first_order": True, "holdout": 0}),
    ("chita", {"solver": "block"}),
    ("chita", {"solver": "block", "ridge": 1e-3, "first_order": False, "holdout": 0}),
    ("woodfisher", {}),
    ("obd", {}),
])
def test_a_fisher_of_zero_gradients_is_refused_with_the_reason(tiny_net, tiny_batches, method, hparams):
    before = {name: tensor.clone() for name, tensor in tiny_net.state_dict().items()}
    with pytest.raises(PrunekitError, match=r"every gradient of the objective is zero at these weights \(a frozen "
                                            r"model, or a loss that does not depend on them\).*check the loss"):
        prunekit.prune(tiny_net, method, 0.5, tiny_batches, loss=loss_out_of_reach, fisher_samples=32, **hparams)
    assert all(torch.equal(tensor, before[name]) for name, tensor in tiny_net.state_dict().items())


class WithUnusedHead(nn.Module):
    """A network with a tensor no loss reaches (as a Hugging Face model's pooler under distill)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.unused = nn.Linear(12, 16), nn.Linear(16, 3), nn.Linear(16, 16)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("hparams", [{}, {"solver": "block"}, {"solver": "block", "block_size": 8}])
def test_a_tensor_out_of_the_losss_reach_is_pruned_and_does_not_stop_the_solve(hparams):
    torch.manual_seed(0)
    model = WithUnusedHead()
    batches = [(torch.randn(16, 12), torch.randint(0, 3, (16,))) for _ in range(4)]
    result = prunekit.prune(model, "chita", 0.5, batches, fisher_samples=32, holdout=32, **hparams)
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(torch.isfinite(t.weight).all() for t in (model.body, model.head, model.unused))


def test_stage_settings_are_checked(tiny_net):
    with pytest.raises(PrunekitError, match="above the target sparsity 0.3; lower --base"):
        prunekit.prune(tiny_net, "chita++", 0.3, Unreadable(), base=0.5)
    with pytest.raises(PrunekitError, match=r"schedule='steep' is invalid: set it to one of linear, cubic"):
        prunekit.prune(tiny_net, "chita++", 0.8, Unreadable(), schedule="steep")
    with pytest.raises(PrunekitError, match="leave no epoch"):
        prunekit.prune(tiny_net, "chita-gradual", 0.8, Unreadable(), epochs=10, events=3, prune_every=5)


def test_gradual_prunes_on_a_cubic_schedule_and_fine_tunes_under_the_mask(tiny_net, tiny_batches):
    data = TinyLoader(tiny_batches)
    result = prunekit.prune(tiny_net, "chita-gradual", 0.9, data, events=3, prune_every=1, epochs=4,
                            outer_base=0.5, fisher_samples=2, fisher_batch=8, lr=0.01, block_size=50)
    events = [event for event in result.history if "event" in event]
    assert [e["sparsity"] for e in events] == pytest.approx([0.5, 0.5 + 0.4 * (1 - 0.5 ** 3), 0.9])
    assert [e["epochs"] for e in events] == [1, 2, 4]
    assert data.epochs_seen == [0, 1, 2, 3]  # each segment continues the data's epochs
    assert result.sparsity == pytest.approx(0.9, abs=1e-3)
    for target in find_targets(tiny_net)[0]:
        assert (target.weight[~result.masks[target.name]] == 0).all()


class TinyLoader(list):
    def __init__(self, batches):
        super().__init__(batches)
        self.epochs_seen = []

    def set_epoch(self, epoch):
        self.epochs_seen.append(epoch)


def test_chita_end_to_end_on_a_small_trained_model():
    torch.manual_seed(0)
    digits = load_dataset("digits")
    model = create_model_for("mlpnet", 10, digits.input_shape)
    train = Loader.for_dataset(digits, "train", 64, augment=False, seed=0)
    Trainer(model, train, TrainConfig(epochs=15, lr=0.1, weight_decay=0), progress=False).fit()
    test = Loader.for_dataset(digits, "test", 500)
    dense = evaluate(model, test)["accuracy"]
    accuracy = {}
    for method, hparams, seeds in (("magnitude", {}, [0]), ("chita", {"fisher_samples": 500}, [0, 1, 2])):
        for seed in seeds:  # CHITA's Fisher examples differ by seed; magnitude takes none
            pruned = copy.deepcopy(model)
            data = Loader.for_dataset(digits, "train", 100, augment=False, shuffle=True, seed=seed)
            prunekit.prune(pruned, method, 0.85, data, seed=seed, **hparams)
            accuracy.setdefault(method, []).append(evaluate(pruned, test)["accuracy"])
    assert dense > 0.9
    # measured: magnitude 0.77, CHITA 0.87-0.89 over the three seeds
    assert all(chita > accuracy["magnitude"][0] + 0.05 for chita in accuracy["chita"])


@pytest.mark.parametrize("linear", [False, True])
def test_nearby_refits_equal_the_backsolve_through_a_run_of_swaps(linear):
    q = random_problem(8, 40, linear=linear)
    refits = NearbyRefits(q)
    generator = torch.Generator().manual_seed(3)
    support = torch.zeros(40, dtype=torch.bool)
    support[:20] = True
    for _ in range(6):  # swaps of a few columns, then one jump to an unrelated support
        swap = torch.randperm(40, generator=generator)[:3]
        support = support.clone()
        support[swap] = ~support[swap]
        torch.testing.assert_close(refits.refit(support), q.refit(support))
    support = torch.arange(40) % 2 == 0
    torch.testing.assert_close(refits.refit(support), q.refit(support))
