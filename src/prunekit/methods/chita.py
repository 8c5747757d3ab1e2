"""CHITA: pruning as ℓ0-constrained least squares on the low-rank empirical Fisher.

Benbaki, Chen, Meng, Hazimeh, Ponomareva, Zhao, Mazumder, "Fast as CHITA: Neural Network Pruning
with Combinatorial Optimization", ICML 2023 (arXiv:2302.14623); notes in methods.md §2.

Around the current weights w̄ the loss is modelled with n gradients, the rows of G, as the
empirical Fisher (1/n)GᵀG. Scaled by n, with a ridge, the pruning problem becomes

    minimise  ½‖G(w̄ − w)‖² + λ'‖w − w̄‖² + αᵀw   subject to  ‖w‖₀ ≤ k
    λ' = λn/2,   α = Gᵀ1 / B with the first-order term (B examples per gradient), else 0

and the weights after pruning are the solver's, not the original ones (OBS's weight update,
for many weights jointly).

What the model is fitted to is n gradients, and an exact solver fits them closely: at the reference
code's λ = 1e-4 the refit and the pursuit lower f far below what its early-stopped IHT reaches, and
the weights do worse on other examples. So each stage holds out --holdout examples after the
Fisher's, and (--ridge auto, --first-order auto, the defaults) chooses λ from a path scaled to G and
whether to keep α by the held-out loss of the backsolve on the magnitude support; the solver then runs
with that local model, and a stage whose answer does worse on the held-out examples than that
backsolve returns the backsolve (`safeguard` in its history event). Weights whose column of G is zero
(no sampled loss depends on them, e.g. a dead unit's) start pruned, as the reference code drops them.
Solvers (`--solver`):
- `iht` (default): the active-set IHT with exact line search (the paper's Alg. 3–4) from one IHT
  step from w̄, then an exact refit on the support it found and IHT steps between exact refits
  (hard thresholding pursuit). The line-searched steps converge slowly on an ill-conditioned G and
  rarely swap weights; from a refit, where the gradient on the support is zero, one step can.
  Every refit is the exact minimiser on its support, so each only lowers the objective.
- `backsolve` (CHITA-BSO, Alg. 5): magnitude support (or one line-searched gradient step when the
  first-order term is on), then the closed-form ridge refit on that support via Woodbury.
- `block` (Alg. 6): the backsolve under a block-diagonal Fisher, for models of any size: each block's
  GᵀG summed as G's rows are computed (blocks narrower than n) or G streamed a group of tensors at a
  time, and the blocks solved a chunk at a time (`solve_blockwise`); the start is the budget's
  selection by OBS saliency or the magnitude support, as the held-out examples prefer, and under an
  unstructured budget the same pursuit follows within each block.
`chita++` solves at a rising sequence of sparsities, recomputing G at the current weights each
stage (Alg. 1); `chita-gradual` interleaves CHITA prune events with SGD fine-tuning (§2.3).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from ..errors import PrunekitError
from ..fisher import (
    BLOCK_CHUNK_BYTES,
    PRECISIONS,
    AccumulatedBlocks,
    BlockChunk,
    FisherHparams,
    GradientMatrix,
    WeightLayout,
    GroupedGradients,
    accumulated_hessian_bytes,
    block_width,
    chunks_of_gradients,
    fitted_chunk,
    streamed_parts,
    streamed_groups,
    fisher_examples,
    call_activation_bytes,
    gradient_call_bytes,
    gradient_matrix,
    loss_with_weights,
    matrix_bytes,
    release_freed_memory,
    require_memory,
    GIB,
    memory_needed,
    require_some_gradient,
)
from ..hparams import Check, group, integer, is_integer, is_number, number, one_of, setting
from ..masks import MASKED, attach_masks, mask_of
from ..objectives import Batch, Objective, batch_examples, slice_batch, to_device
from ..schedules import STAGE_SCHEDULES, stage_sparsities
from ..training import TrainConfig
from . import PruneContext, register
from ._chita_solvers import (
    ACTIVE_SET_WIDTH,
    FLOAT64_COLUMNS,
    Blocks,
    FullFits,
    Iterate,
    NearbyRefits,
    Pools,
    Quadratic,
    active_set_iht,
    iterate_at,
    refit_pursuit,
)
from ._stages import Stages
from ._training import require_training_data, train_under_masks

SOLVERS = ("iht", "backsolve", "block")
AUTO = "auto"
# --ridge auto: 2λ' tried, as multiples of the mean diagonal of GᵀG (λ = c·‖G‖²/(n·p)), the largest first.
# On MLPNet the held-out slice prefers 1e-4..1e-3 at 0.5-0.9 without the first-order term, more near 0.98,
# and the upper end with the first-order term (its step along the gradient needs holding back).
RIDGE_PATH = (1e2, 1e1, 1e0, 1e-1, 1e-2, 1e-3, 1e-4)
HELD_OUT_CHUNK = 256  # held-out examples per forward pass when scoring a candidate (no gradients: cheap)


@dataclass
class ChitaHparams(FisherHparams):
    """One CHITA solve: the local model (n, ridge, first-order term) and the solver."""

    ridge: float | str = setting(AUTO, "λ: ridge keeping the solution near the current weights (λ' = λ·n/2 in the "
                                 "objective); auto: at each stage the one, of a path spanning the Gram matrix's "
                                 "scale, whose backsolve on the magnitude support does best on the held-out "
                                 "examples; a number > 0 fixes it",
                                 Check("auto or a finite number > 0", lambda v: v == AUTO or (is_number(v) and v > 0)))
    holdout: int = setting(1000, "examples after the Fisher's, held out to choose --ridge and --first-order auto "
                           "and to check that a stage does better on them than the backsolve on the magnitude "
                           "support (which it returns otherwise); fewer when the data has fewer; 0: neither",
                           integer(0))
    first_order: bool | str = setting(AUTO, "keep the gradient term of the local model: true, false (OBS-style, "
                                      "the gradient taken as 0 at a trained model), or auto: at each stage as the "
                                      "held-out examples prefer, chosen with the ridge (the term helps once earlier "
                                      "stages have moved the weights off a minimum)",
                                      Check("auto, true or false", lambda v: v == AUTO or isinstance(v, bool)))
    solver: str = setting(AUTO, "iht: active-set IHT with line search; backsolve: magnitude support + ridge "
                          "refit; block: backsolve under a block-diagonal Fisher (large models); auto: iht (backsolve "
                          "for structured budgets) where G fits --max-memory, else block", one_of(AUTO, *SOLVERS))
    block_size: int | str = setting(AUTO, "block solver: tensors of at least this many weights are cut into blocks "
                                    "of about this size; auto: the widest of 500, 256, ..., 1 whose plan fits "
                                    "--max-memory", Check("auto or an integer >= 1",
                                                          lambda v: v == AUTO or (is_integer(v) and v >= 1)))
    iterations: int = setting(100, "iht: IHT steps per active-set round", integer(1))
    active_set_rounds: int = setting(10, "iht: times the active set may grow", integer(1))
    pursuit_rounds: int = setting(10, "iht and block: rounds of IHT step + exact refit after the start, each "
                                  "swapping weights while the objective falls (0: off; block: unstructured "
                                  "budgets only)", integer(0))
    tolerance: float = setting(1e-7, "iht: stop when a step lowers the objective by less than this fraction",
                               number(0, 1, high_open=True))
    # float32 by default: on MLPNet (0.5-0.98) it moved chita's accuracy by -0.7..+0.05 points and chita++'s by
    # +0.04 / -0.01 at 0.8 / 0.98, at half the memory and about 60% of the time (benchmarks/RESULTS.md).
    precision: str = setting("float32", "float32 | float64: how G is stored and the IHT's products computed (refits "
                             "and solves are float64 either way; float64 doubles the memory)", one_of(*PRECISIONS))

    def check_relations(self) -> None:
        if self.holdout == 0 and AUTO in (self.ridge, self.first_order):
            raise PrunekitError("--ridge auto and --first-order auto choose on held-out examples but --holdout is 0; "
                                "raise --holdout, or set a numeric --ridge and --first-order true or false")

    @property
    def chooses(self) -> bool:
        """Whether the held-out examples choose the local model (and so at least one is needed)."""
        return AUTO in (self.ridge, self.first_order)


@dataclass
class ChitaPlusPlusHparams(ChitaHparams):
    """CHITA++: several CHITA solves at rising sparsities, G recomputed at the current weights each stage."""

    stages: int = setting(20, "number of stages (the last one is at the target sparsity)", integer(1))
    schedule: str = setting("exponential", f"stage sparsities from --base to the target: "
                            f"{', '.join(STAGE_SCHEDULES)}", one_of(*STAGE_SCHEDULES))
    base: float = setting(0.1, "sparsity of the schedule's first stage (below the target)",
                          number(0, 1, high_open=True))
    intermediate: str = setting(AUTO, "how the stages before the last are solved: paper: the reference code's step "
                                "(the IHT's own weights under the first-order local model at the smallest ridge: "
                                "no refit, no held-out choice); chosen: as the last stage; auto: paper with the iht "
                                "solver, else chosen", one_of(AUTO, "paper", "chosen"))

    def check_relations(self) -> None:
        super().check_relations()
        if self.intermediate == "paper" and self.solver not in ("iht", AUTO):
            raise PrunekitError("--intermediate paper takes the iht solver's own weights; use --solver iht, or "
                                "--intermediate chosen")

    @property
    def paper_stages(self) -> bool:
        """Whether the stages before the last take the paper's step. Chosen greedily on held-out examples, each
        stage does better there but the last does worse: on MLPNet (chita++, 20 stages) the paper's steps in
        between gave 93.96 / 93.57 / 92.86 / 88.62% at 0.8 / 0.9 / 0.95 / 0.98 against 93.45 / 93.06 / 92.46 /
        88.31% chosen; its first stage lifts the held-out loss from 0.19 to 0.38 and the later ones train it down."""
        return self.intermediate == "paper" or (self.intermediate == AUTO and self.solver == "iht")


@dataclass
class ChitaGradualHparams(ChitaHparams):
    """CHITA prune events on a cubic schedule with SGD fine-tuning in between (the paper's gradual recipe)."""

    training: TrainConfig = group(TrainConfig, help={
        "epochs": "total epochs, events included (the last segment is the rest)",
        "weight_decay": "L2 penalty of the fine-tuning SGD (>= 0)"},
        epochs=100, weight_decay=3.75e-5)  # the recipe's own values
    events: int = setting(7, "pruning events (the last one reaches the target)", integer(1))
    prune_every: int = setting(12, "epochs of fine-tuning after each event but the last, one cosine LR cycle each",
                               integer(1))
    outer_base: float = setting(0.5, "sparsity of the first event", number(0, 1, high_open=True))
    inner_stages: int = setting(1, "CHITA++ stages per event, from the previous event's sparsity", integer(1))
    # The recipe's own values where they differ from the one-shot defaults.
    fisher_samples: int = setting(500, "n: gradients in the empirical Fisher per event", integer(1))
    fisher_batch: int = setting(16, "examples averaged into each gradient", integer(1))
    solver: str = setting("block", "iht | backsolve | block (the recipe uses block)", one_of(*SOLVERS))

    def check_relations(self) -> None:
        super().check_relations()
        if self.training.epochs <= self.prune_every * (self.events - 1):
            raise PrunekitError(f"{self.events} events every {self.prune_every} epochs leave no epoch after the "
                                f"last one within --epochs {self.training.epochs}; raise --epochs or lower --events")


# ---------------------------------------------------------------- methods

def _check_chita(ctx: PruneContext, hp: ChitaHparams) -> None:
    check_before_work(ctx, hp, ctx.sparsity)


@register("chita", ChitaHparams, "CHITA (Benbaki et al. 2023): ℓ0-constrained least squares on the empirical Fisher; "
          "weights re-solved, not just masked", needs_data=True, check=_check_chita)
def chita(ctx: PruneContext, hp: ChitaHparams) -> dict[str, torch.Tensor]:
    return solve_stages(ctx, resolved(ctx, hp, ctx.sparsity), [ctx.sparsity])


def _plus_plus_stages(ctx: PruneContext, hp: ChitaPlusPlusHparams) -> list[float]:
    if hp.base > ctx.sparsity:
        raise PrunekitError(f"chita++ --base {hp.base} is above the target sparsity {ctx.sparsity}; lower --base")
    return stage_sparsities(ctx.sparsity, hp.stages, hp.schedule, hp.base)


def _check_plus_plus(ctx: PruneContext, hp: ChitaPlusPlusHparams) -> None:
    check_before_work(ctx, hp, min(_plus_plus_stages(ctx, hp)))


@register("chita++", ChitaPlusPlusHparams, "CHITA++: CHITA at rising sparsities, the Fisher recomputed at each stage",
          needs_data=True, check=_check_plus_plus)
def chita_plus_plus(ctx: PruneContext, hp: ChitaPlusPlusHparams) -> dict[str, torch.Tensor]:
    sparsities = _plus_plus_stages(ctx, hp)
    return solve_stages(ctx, resolved(ctx, hp, min(sparsities)), sparsities)


def _events(ctx: PruneContext, hp: ChitaGradualHparams) -> list[float]:
    if hp.outer_base > ctx.sparsity:
        raise PrunekitError(f"chita-gradual --outer-base {hp.outer_base} is above the target sparsity "
                            f"{ctx.sparsity}; lower --outer-base")
    return stage_sparsities(ctx.sparsity, hp.events, "cubic", hp.outer_base)


def _check_gradual(ctx: PruneContext, hp: ChitaGradualHparams) -> None:
    require_training_data(ctx)
    check_before_work(ctx, hp, min(_events(ctx, hp)))


@register("chita-gradual", ChitaGradualHparams, "CHITA prune events on a cubic schedule with SGD fine-tuning, "
          "momentum reset and cosine LR restarts in between", needs_data=True, family="training",
          check=_check_gradual)
def chita_gradual(ctx: PruneContext, hp: ChitaGradualHparams) -> dict[str, torch.Tensor]:
    previous, epoch = 0.0, 0
    hp = resolved(ctx, hp, min(_events(ctx, hp)))
    for event, sparsity in enumerate(_events(ctx, hp)):
        inner = stage_sparsities(sparsity, hp.inner_stages, "exponential", base=previous)
        masks = solve_stages(ctx, hp, inner)
        epochs = hp.training.epochs - epoch if event == hp.events - 1 else hp.prune_every
        # A segment per event: a new optimizer (momentum reset) and a new cosine cycle (LR restart).
        history = train_under_masks(ctx, masks, replace(hp.training, epochs=epochs), segment=event,
                                    first_epoch=epoch)
        epoch += epochs
        ctx.record(event=event, sparsity=sparsity, epochs=epoch,
                   **{name: value for name, value in history[-1].items() if name.startswith("train_")})
        previous = sparsity
    return masks


# ---------------------------------------------------------------- one or more CHITA solves

def solve_stages(ctx: PruneContext, hp: ChitaHparams, sparsities: list[float]) -> dict[str, torch.Tensor]:
    """CHITA at each sparsity in turn, each around the weights the previous one left (G recomputed)."""
    layout = WeightLayout.of(ctx.targets)
    stages = Stages(ctx, monotone=False)  # a later stage may bring back what an earlier one pruned
    for stage, sparsity in enumerate(sparsities):
        # Each stage takes the next examples the data gives (a shuffling loader gives new ones each pass).
        examples, held_out = _calibration(ctx, hp)
        anchor = layout.flatten({t.name: t.weight for t in ctx.targets}).to(PRECISIONS[hp.precision])
        paper = isinstance(hp, ChitaPlusPlusHparams) and hp.paper_stages and stage < len(sparsities) - 1
        scorer = None if held_out is None or paper else HeldOut(ctx, layout, held_out, HELD_OUT_CHUNK)
        if hp.solver == "block":
            solved = solve_blockwise(ctx, hp, examples, anchor, sparsity, scorer)
        else:
            solved = solve_whole(ctx, hp, examples, anchor, sparsity, scorer, paper)
        # The solver's support already holds the plan's counts: it is the stage's mask as it is.
        masks = stages.accept(layout.unflatten(solved.solution.support))
        _install(ctx, layout, solved.solution.w, masks)
        stages.record(stage=stage, scheduled=sparsity, solver=hp.solver, block_size=hp.block_size, objective=solved.trace,
                      swapped=solved.swapped, gradients=solved.route, ridge=solved.model.ridge,
                      first_order=solved.model.first_order, held_out=solved.held_out, safeguard=solved.safeguard,
                      start=solved.start, paper=paper)
    return stages.masks


def _calibration(ctx: PruneContext, hp: ChitaHparams) -> tuple[Batch, Batch | None]:
    """The Fisher's examples, and up to --holdout examples after them (None when there are none)."""
    count = hp.fisher_samples * hp.fisher_batch
    needs = "fisher_samples × fisher_batch" + (", and one held out to choose the auto settings" if hp.chooses else "")
    examples = fisher_examples(ctx.data, count + hp.holdout, at_least=count + hp.chooses, needs=needs)
    examples = to_device(examples, ctx.device)
    total = batch_examples(examples)
    held_out = slice_batch(examples, count, total) if total > count else None
    return slice_batch(examples, 0, count), held_out


class HeldOut:
    """The objective's mean loss on held-out examples with the targets' weights set to a flat vector.

    The examples are cut into chunks once, with what the loss needs that does not depend on the weights
    (distill's dense outputs) computed once: a stage scores a dozen candidates on them."""

    def __init__(self, ctx: PruneContext, layout: WeightLayout, examples: Batch, chunk: int) -> None:
        self.ctx, self.layout = ctx, layout
        count = batch_examples(examples)
        self.count = count
        self.chunks = [(*ctx.objective.frozen(slice_batch(examples, start, start + chunk)),
                        min(chunk, count - start)) for start in range(0, count, chunk)]

    def loss(self, w: torch.Tensor) -> float:
        weights = self.layout.unflatten(w)
        total = 0.0
        for objective, part, size in self.chunks:
            total += float(loss_with_weights(self.ctx.model, self.ctx.targets, weights, objective, part)) * size
        release_freed_memory()  # the forward passes' activations, which glibc would keep beside G
        return total / self.count


@dataclass
class Solved:
    solution: Iterate
    trace: list[float]  # f at the start and after each step of the search, of the local model chosen
    swapped: int  # weights the solution keeps that the start did not
    model: LocalModel
    held_out: float | None  # the held-out loss of the solution's weights (None: nothing held out)
    safeguard: bool  # the solution is the backsolve on the magnitude support, which did better held out
    route: str  # how the gradients were computed (fisher.RowGradients.route)
    start: str = "magnitude"  # the support the search started from: magnitude, or (block solver) saliency


def solve_whole(ctx: PruneContext, hp: ChitaHparams, examples: Batch, anchor: torch.Tensor, sparsity: float,
                held_out: HeldOut | None, paper: bool = False) -> Solved:
    """The iht or backsolve solver, on G of all the targets at once (`paper`: the reference code's IHT step)."""
    g = gradient_matrix(ctx.model, ctx.targets, examples, ctx.objective, batch=hp.fisher_batch, chunk=hp.fisher_chunk,
                        dtype=PRECISIONS[hp.precision], meter=ctx.meter)
    require_some_gradient(g.reached)
    return solve(ctx, hp, g, anchor.to(g.rows.dtype), sparsity, held_out, paper)


def solve(ctx: PruneContext, hp: ChitaHparams, g: GradientMatrix, anchor: torch.Tensor, sparsity: float,
          held_out: HeldOut | None, paper: bool = False) -> Solved:
    """The solver's weights and support at `sparsity`, unless the backsolve on the magnitude support does
    better on the held-out examples; with --ridge or --first-order auto, the local model is the one whose
    backsolve does best on them. `paper`: the reference code's step, the iht solver's own weights (no refit)
    under the first-order local model at the smallest ridge, nothing held out."""
    models = _local_models(hp, g, ctx.objective)
    model, floor, nearby = models[0], None, None
    if paper:
        model = min(models, key=lambda m: (not m.first_order, m.ridge))
    if held_out is not None:
        # The backsolve on the magnitude support (CHITA-BSO) for each local model: the held-out examples choose
        # the model with it (one factorisation for a ridge path), and it is the floor the answer has to beat.
        magnitude = g.layout.flatten(ctx.select(g.layout.unflatten(anchor.abs()), sparsity))
        gram = None
        if hp.solver == "iht" and int(magnitude.sum()) > g.n:  # the pursuit's refits start from it, by swaps
            gram = _quadratic(g, anchor, model).gram(magnitude)
            nearby = magnitude, gram
        model, floor = _choose(held_out, models, _fits(g, anchor, magnitude, models, gram))
    # A weight whose column of G is zero is one the sampled loss never sees (e.g. a dead unit's): only the
    # ridge's pull would keep it, and at high sparsity such weights take a large share of the budget
    # (61 of the 647 kept at 0.98 on MLPNet). It starts pruned, as the reference code drops such columns.
    q = _quadratic(g, anchor * g.rows.ne(0).any(dim=0), model)
    first_step, start = _start(ctx, g, q, sparsity)
    trace = [iterate_at(q, first_step * start, start).value]
    solution = _search(ctx, hp, g, q, first_step, start, sparsity, trace, nearby, refit=not paper)
    swapped = int((solution.support & ~start).sum())
    if floor is None:
        return Solved(solution, trace, swapped, model, None, False, g.route)
    loss = held_out.loss(solution.w)
    if floor.loss < loss:
        return Solved(iterate_at(_quadratic(g, anchor, model), floor.w, magnitude), trace,
                      int((magnitude & ~start).sum()), model, floor.loss, True, g.route)
    return Solved(solution, trace, swapped, model, loss, False, g.route)


def _choose(held_out: HeldOut, models: list[LocalModel], fits: list[torch.Tensor]) -> tuple[LocalModel, Candidate]:
    """The local model whose backsolve on the magnitude support does best on the held-out examples, with it."""
    return min(((m, Candidate(w, held_out.loss(w))) for m, w in zip(models, fits)), key=lambda pair: pair[1].loss)


@dataclass(frozen=True)
class LocalModel:
    ridge: float  # λ (per_tensor: a factor of each tensor's scale ‖G_t‖²/(n·p_t))
    first_order: bool  # the gradient term kept
    per_tensor: bool = False


@dataclass
class Candidate:
    w: torch.Tensor
    loss: float  # on the held-out examples


def _first_orders(hp: ChitaHparams, objective: Objective | None) -> tuple[bool, ...]:
    """Whether the local model keeps the first-order term, or (auto) both to choose from. An objective whose
    curvature rows are not its gradient has a term only where it says how it scales (distill's MSE)."""
    has_gradient = objective is None or objective.curvature_has_gradient or objective.gradient_scale is not None
    if hp.first_order == AUTO:
        return (False, True) if has_gradient else (False,)
    if hp.first_order and not has_gradient:
        raise PrunekitError(f"--first-order true needs the loss's gradient at the scale of its curvature, which the "
                            f"{type(objective).__name__} objective does not give (distill with kind kl); use "
                            "--first-order false or auto")
    return (hp.first_order,)


def _local_models(hp: ChitaHparams, g: GradientMatrix, objective: Objective | None) -> list[LocalModel]:
    """The local model to use, or for the auto settings those to choose from (ridges scaled to this G)."""
    orders = _first_orders(hp, objective)
    if hp.ridge != AUTO:
        return [LocalModel(hp.ridge, first_order) for first_order in orders]
    scale = float(torch.linalg.vector_norm(g.rows)) ** 2 / (g.n * g.p)  # > 0: solve_whole refuses an all-zero G
    return [LocalModel(factor * scale, first_order) for first_order in orders for factor in RIDGE_PATH]


def _quadratic(g: GradientMatrix, anchor: torch.Tensor, model: LocalModel) -> Quadratic:
    return Quadratic.on_columns(g.rows, anchor, model.ridge * g.n / 2,
                                g.gradient_sum() / g.batch if model.first_order else None)


def _start(ctx: PruneContext, g: GradientMatrix, q: Quadratic, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first IHT step from w̄, w̄ − α/L (w̄ when α = 0), and its top k: the start's support."""
    first_step = q.anchor if q.linear is None else q.anchor - q.linear / q.lipschitz(ctx.generator())
    return first_step, g.layout.flatten(ctx.select(g.layout.unflatten(first_step.abs()), sparsity))


def _fits(g: GradientMatrix, anchor: torch.Tensor, support: torch.Tensor, models: list[LocalModel],
          gram: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The backsolve on `support` for each local model (one factorisation per ridge path; `gram`: G_S G_Sᵀ if at
    hand)."""
    weights = {}
    for first_order in dict.fromkeys(model.first_order for model in models):
        path = [model for model in models if model.first_order == first_order]
        refits = _quadratic(g, anchor, path[0]).refit_path(support, [model.ridge * g.n / 2 for model in path], gram)
        weights.update(zip(path, refits))
    return [weights[model] for model in models]


def _search(ctx: PruneContext, hp: ChitaHparams, g: GradientMatrix, q: Quadratic, first_step: torch.Tensor,
            start: torch.Tensor, sparsity: float, trace: list[float],
            nearby: tuple[torch.Tensor, torch.Tensor] | None = None, refit: bool = True) -> Iterate:
    """The solver's weights and support from the start, f after each step appended to `trace`; `nearby`: a
    support wider than n and its Gram matrix, from which the pursuit's refits update by swaps; `refit` false:
    the IHT's own weights, without the pursuit's refits."""
    if hp.solver == "iht":
        pools = Pools.from_plan(ctx.plan.at(sparsity), g.layout)
        start_point = iterate_at(q, first_step * start, start)
        iht = active_set_iht(q, pools, start_point, pools.widened(first_step, ACTIVE_SET_WIDTH),
                             iterations=hp.iterations, rounds=hp.active_set_rounds, tolerance=hp.tolerance,
                             lipschitz=q.lipschitz(ctx.generator()), trace=trace)
        if not refit:
            return iht
        refits = None if nearby is None else NearbyRefits(q, *nearby)
        return refit_pursuit(FullFits(q, sum(pools.keep), refits), pools, iht.support, hp.pursuit_rounds, trace)
    solution = iterate_at(q, q.refit(start), start)
    trace.append(solution.value)
    return solution


# ---------------------------------------------------------------- the block solver, streamed

def solve_blockwise(ctx: PruneContext, hp: ChitaHparams, examples: Batch, anchor: torch.Tensor, sparsity: float,
                    held_out: HeldOut | None) -> Solved:
    """The block solver (Alg. 6) at any scale: G is computed for one group of tensors at a time (the memory plan's
    groups) and each group's block Hessians formed, solved and dropped a chunk at a time; nothing of size n×p or
    p×block is ever held.

    The start may be the budget's selection by OBS saliency under the local model (each weight's w̄ᵢ²/(2[A⁻¹]ᵢᵢ),
    A its block's Hessian of f) instead of the paper's magnitude support, whose allocation across blocks lost most: on
    MiniLM at 0.5 / 0.7 (distill) the pursuit from it stayed 1.3 / 0.9 points of cosine below WoodFisher's OBS
    selection on the same Fisher. Then the chosen model's pursuit runs in every block, each block keeping the
    start's count (swaps across blocks would need every block at once). With held-out examples the passes are
    three per group of models (`StreamedFisher.model_groups`): backsolves on the magnitude support, with the
    saliencies; backsolves on each model's saliency support; the held-out examples choose the start (model and
    support) from both, and the magnitude ones' best is the safeguard's floor. Summed Hessians and a single
    group's G cost no gradients after the first pass."""
    layout = WeightLayout.of(ctx.targets)
    fisher = StreamedFisher(ctx, hp, examples)

    def selected(scores: torch.Tensor) -> torch.Tensor:
        return layout.flatten(ctx.select(layout.unflatten(scores), sparsity))

    magnitude = selected(anchor.abs())
    model, start, floor = _block_start(fisher, _block_models(hp, ctx.objective), anchor, magnitude, selected, held_out)
    pursue = hp.pursuit_rounds if ctx.budget.structure == "unstructured" else 0
    w, support, trace = fisher.pursuit(anchor, start.support, model, pursue)
    solution = Iterate(w, support, None, trace[-1])
    swapped = int((support & ~start.support).sum())
    if floor is None:
        return Solved(solution, trace, swapped, model, None, False, fisher.route, start.name)
    loss = held_out.loss(w)
    if floor.loss < loss:
        return Solved(Iterate(floor.w.to(w.dtype), magnitude, None, math.nan), trace,
                      int((magnitude & ~start.support).sum()), model, floor.loss, True, fisher.route, start.name)
    return Solved(solution, trace, swapped, model, loss, False, fisher.route, start.name)


@dataclass
class Start:
    name: str  # magnitude | saliency
    support: torch.Tensor


def _block_start(fisher: StreamedFisher, models: list[LocalModel], anchor: torch.Tensor, magnitude: torch.Tensor,
                 selected: Callable[[torch.Tensor], torch.Tensor],
                 held_out: HeldOut | None) -> tuple[LocalModel, Start, Candidate | None]:
    """The local model and the support the pursuit starts from, and the safeguard's floor (the magnitude
    support's best backsolve held out; None without held-out examples, when the one model starts from its
    saliency support). The models are solved a group at a time (`StreamedFisher.model_groups`), each group's
    candidates dropped once the held-out examples have scored them."""
    if held_out is None:
        model = models[0]
        return model, Start("saliency", selected(
            fisher.backsolves(anchor, None, [model], saliencies=True).saliencies[model.ridge])), None
    floor = best = None
    for together in fisher.model_groups(models):
        first = fisher.backsolves(anchor, magnitude, together, saliencies=True)
        seen = first.seen
        salient = {factor: selected(saliency) for factor, saliency in first.saliencies.items()}
        floor = _better(floor, _choose(held_out, together, first.fits))
        del first
        best = _better(best, (*_choose(held_out, together, fisher.backsolves(anchor, salient, together).fits),
                              salient))
    if best[1].loss <= floor[1].loss:
        return best[0], Start("saliency", best[2][best[0].ridge]), floor[1]
    # Weights no sampled loss sees start pruned, as in the whole-G solvers.
    return floor[0], Start("magnitude", selected(anchor.abs() * seen)), floor[1]


def _better(kept: tuple | None, new: tuple) -> tuple:
    """The one of two (model, candidate, ...) whose candidate does better held out (the first on a tie)."""
    return new if kept is None or new[1].loss < kept[1].loss else kept


def _block_models(hp: ChitaHparams, objective: Objective | None = None) -> list[LocalModel]:
    """As `_local_models`, but an auto ridge is a factor of each tensor's own scale ‖G_t‖²/(n·p_t): the blocks are
    solved a group of tensors at a time, never with all of G at hand."""
    orders = _first_orders(hp, objective)
    if hp.ridge != AUTO:
        return [LocalModel(hp.ridge, first_order) for first_order in orders]
    return [LocalModel(factor, first_order, per_tensor=True) for first_order in orders for factor in RIDGE_PATH]


@dataclass
class Backsolves:
    fits: list[torch.Tensor]  # per local model, the block backsolve on its support
    saliencies: dict[float, torch.Tensor]  # per ridge, OBS's saliency of every weight (float32), if asked for
    seen: torch.Tensor | None  # with the saliencies: which weights' columns of G are not all zero


class StreamedFisher:
    """The block solver's passes over the blocks' Hessians, a chunk of blocks at a time. Where the blocks are
    narrower than n, the Hessians are summed as G's rows are computed, in one gradient pass and p × block numbers
    (`AccumulatedBlocks`); otherwise G is computed a group of tensors at a time on each pass, a single group's once
    (`GroupedGradients`)."""

    def __init__(self, ctx: PruneContext, hp: ChitaHparams, examples: Batch) -> None:
        dtype = PRECISIONS[hp.precision]
        settings = dict(batch=hp.fisher_batch, chunk=hp.fisher_chunk, dtype=dtype, meter=ctx.meter)
        if accumulates(hp):
            settings["chunk"] = _accumulated_parts(hp, ctx)[1]
            self.source = AccumulatedBlocks(ctx.model, ctx.targets, examples, ctx.objective, hp.block_size, **settings)
            self.gradients = None
        else:
            groups = streamed_groups(ctx.targets, hp, _block_fixed_parts(hp, ctx), dtype)
            self.gradients = GroupedGradients(ctx.model, ctx.targets, examples, ctx.objective, groups, **settings)
        self.block_size = hp.block_size

    @property
    def route(self) -> str:
        return (self.gradients or self.source).route

    def model_groups(self, models: list[LocalModel]) -> list[list[LocalModel]]:
        """The local models to solve together in a pass: all of them where a pass computes G again, otherwise one
        ridge's at a time (a pass over summed Hessians costs no gradients, and fewer candidates are held)."""
        if self.gradients is not None:
            return [models]
        return [[model for model in models if model.ridge == ridge] for ridge in dict.fromkeys(m.ridge for m in models)]

    def chunks(self) -> Iterator[BlockChunk]:
        return iter(self.source) if self.gradients is None else chunks_of_gradients(self.gradients, self.block_size)

    def backsolves(self, anchor: torch.Tensor, support: torch.Tensor | dict[float, torch.Tensor] | None,
                   models: list[LocalModel], saliencies: bool = False) -> Backsolves:
        """The block backsolve of every local model on `support` (one for all, or one per ridge; None: none), and
        if asked every weight's OBS saliency under each model's ridge: 0 for a weight whose column of G is zero,
        which no sampled loss sees, so that it starts pruned."""
        factors = list(dict.fromkeys(model.ridge for model in models))
        out = Backsolves([torch.zeros_like(anchor) for _ in models] if support is not None else [],
                         {factor: torch.zeros_like(anchor, dtype=torch.float32) for factor in factors} if saliencies
                         else {}, torch.zeros_like(anchor, dtype=torch.bool) if saliencies else None)
        for chunk in self.chunks():
            columns = chunk.columns
            blocks = Blocks.of_hessian(chunk.hessian, anchor[columns], chunk.width, 0.0)
            ridges = {model.ridge: _ridge(blocks, chunk, model) for model in models}
            if saliencies:
                out.seen[columns] = chunk.seen
                for factor, saliency in zip(ridges, blocks.saliencies(list(ridges.values()))):
                    out.saliencies[factor][columns] = blocks.flat(saliency).float() * chunk.seen
            if support is None:
                continue
            linears = [None, _first_order_term(blocks, chunk) if any(m.first_order for m in models) else None]
            per_ridge = support if isinstance(support, dict) else dict.fromkeys(factors, support)
            for kept, same in _grouped_by_support(per_ridge).items():
                solved = blocks.fit_all(_blocked(blocks, kept[columns]), [ridges[f] for f in same], linears)
                for fit, model in zip(out.fits, models):
                    if model.ridge in same:
                        w, _ = solved[same.index(model.ridge)][int(model.first_order)]
                        fit[columns] = blocks.flat(w).to(fit.dtype)
        return out

    def pursuit(self, anchor: torch.Tensor, support: torch.Tensor, model: LocalModel,
                rounds: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """The chosen model's pursuit (a backsolve when `rounds` is 0) from `support` in every block: weights,
        support, and f of the block-diagonal model at the pruned start and at the end."""
        w, found = torch.zeros_like(anchor), torch.zeros_like(support)
        before = after = 0.0
        for chunk in self.chunks():
            columns = chunk.columns
            blocks = Blocks.of_hessian(chunk.hessian, anchor[columns], chunk.width, 0.0)
            blocks = replace(blocks, ridge=_ridge(blocks, chunk, model),
                             linear=_first_order_term(blocks, chunk) if model.first_order else None)
            kept = _blocked(blocks, support[columns])
            before += float(blocks.value(-blocks.anchor * ~kept).sum())
            solved, kept, value = blocks.pursuit(kept, rounds)
            w[columns], found[columns] = blocks.flat(solved).to(w.dtype), blocks.flat(kept)
            after += float(value.sum())
        return w, found, [before, after]


def accumulates(hp: ChitaHparams) -> bool:
    """Whether the block solver sums the blocks' Hessians (fewer numbers than G when blocks are narrower than n)."""
    return hp.block_size < hp.fisher_samples


def _grouped_by_support(per_ridge: dict[float, torch.Tensor]) -> dict[torch.Tensor, list[float]]:
    """The ridges that share a support (one masked system serves them all), by support."""
    groups: dict[int, tuple[torch.Tensor, list[float]]] = {}
    for factor, kept in per_ridge.items():
        groups.setdefault(id(kept), (kept, []))[1].append(factor)
    return dict(groups.values())


def _ridge(blocks: Blocks, chunk: BlockChunk, model: LocalModel) -> torch.Tensor:
    """λ' = λn/2 for every block, λ a factor of the tensor's scale when the model's ridge is per tensor. A tensor
    out of the loss's reach (an unused head) has scale 0 and a zero Hessian: any positive ridge keeps its weights
    as they are, and makes its blocks' systems definite."""
    scale = (chunk.scale or 1.0) if model.per_tensor else 1.0
    return torch.full_like(blocks.ridge, model.ridge * scale * chunk.n / 2)


def _first_order_term(blocks: Blocks, chunk: BlockChunk) -> torch.Tensor:
    """α = Gᵀ1/B on the blocks' weights."""
    return _blocked(blocks, chunk.gradient_sum / chunk.batch).to(torch.float64)


def _blocked(blocks: Blocks, vector: torch.Tensor) -> torch.Tensor:
    """A vector over the blocks' weights laid out as the blocks are (padding: zero / False)."""
    out = torch.zeros(blocks.present.shape, dtype=vector.dtype, device=vector.device)
    out[blocks.present] = vector
    return out


def _block_fixed_parts(hp: ChitaHparams, ctx: PruneContext) -> dict[str, int]:
    """What the block solver holds besides G or the blocks' Hessians: a chunk of blocks (Hessians, G's columns in
    float64, the solve's copies: about 4 times the chunk), the candidates' weights (one vector per local model, and
    a few more), per ridge the saliencies (float32) and their supports, and where G is streamed by groups of
    tensors, the gradient calls' activations (the whole model's, whichever group the call is for)."""
    targets = ctx.targets
    models = _block_models(hp, ctx.objective)
    ridges = len({model.ridge for model in models})
    if accumulates(hp):  # one ridge's models at a time (StreamedFisher.model_groups)
        models, ridges = models[:len(models) // ridges], 1
    p = sum(target.numel for target in targets)
    rows = 0 if accumulates(hp) else hp.fisher_samples  # G's columns come with its blocks (`block_chunks`)
    widths = [block_width(target.numel, hp.block_size) for target in targets]
    widest = max(min(BLOCK_CHUNK_BYTES, math.ceil(target.numel / width) * matrix_bytes(width, max(width, rows),
                                                                                         torch.float64))
                 for target, width in zip(targets, widths))
    parts = {"block chunk": 4 * widest,
             "candidates": matrix_bytes(len(models) + 4, p, PRECISIONS[hp.precision]),
             "saliencies": matrix_bytes(ridges, p, torch.float32) + matrix_bytes(2 * ridges, p, torch.bool)}
    if not accumulates(hp):
        parts["gradient calls' activations"] = call_activation_bytes(hp.fisher_chunk, ctx.example_activations)
    return parts


def _accumulated_parts(hp: ChitaHparams, ctx: PruneContext) -> tuple[dict[str, int], int]:
    """What the block solver holds when it sums the blocks' Hessians: beside them, first the gradient pass (its
    calls, with as many examples each as fit, and the column sums), then the solve (`ACCUMULATED_PHASES`); and
    the examples per gradient call."""
    p = sum(target.numel for target in ctx.targets)
    hessians = accumulated_hessian_bytes(ctx.targets, hp.block_size, PRECISIONS[hp.precision])
    sums = matrix_bytes(1, p, torch.float64)
    chunk = fitted_chunk(hp, p, hessians + sums, ctx.example_activations)
    return {"block Hessians": hessians,
            "gradient pass": gradient_call_bytes(hp, p, chunk, ctx.example_activations) + sums,
            "solve": sum(_block_fixed_parts(hp, ctx).values())}, chunk


ACCUMULATED_PHASES = ("gradient pass", "solve")


def check_before_work(ctx: PruneContext, hp: ChitaHparams, lowest_sparsity: float) -> ChitaHparams:
    """The settings with the auto solver and block size made concrete (`resolved`), once the solver is checked
    against the budget and the memory estimate for the widest stage against --max-memory (kept as the cost's
    planned peak)."""
    concrete = resolved(ctx, hp, lowest_sparsity)
    if concrete.solver == "iht" and ctx.budget.structure != "unstructured":
        raise PrunekitError(f"chita's iht solver selects single weights; for {ctx.budget.structure} sparsity "
                            "use --solver backsolve or --solver block")
    plan = _memory_plan(ctx, concrete, lowest_sparsity)
    if hp.solver == AUTO and concrete.solver == "block" and plan.needed > hp.max_memory * GIB:
        _refuse_every_solver(ctx, hp, concrete, plan, lowest_sparsity)
    ctx.meter.cost.planned_memory_bytes = require_memory(plan.method, plan.parts, hp, plan.knobs, plan.apart)
    return concrete


def _refuse_every_solver(ctx: PruneContext, hp: ChitaHparams, block: ChitaHparams, plan: MemoryPlan,
                         lowest_sparsity: float) -> None:
    """--solver auto found no solver within --max-memory: say what the whole-G one and the narrowest blocks need."""
    whole = "iht" if ctx.budget.structure == "unstructured" else "backsolve"
    needed = _memory_plan(ctx, replace(block, solver=whole), lowest_sparsity).needed
    raise PrunekitError(f"chita would need about {needed / GIB:.2f} GiB with the {whole} solver and "
                        f"{plan.needed / GIB:.2f} GiB with the block solver at blocks of {block.block_size}, above "
                        f"--max-memory {hp.max_memory:g}; lower --fisher-samples (n={hp.fisher_samples}), prune "
                        "fewer tensors (--exclude), or raise --max-memory")


# The block sizes --block-size auto tries, widest first: 500 keeps the solves of the paper's models as they were.
BLOCK_SIZES = (500, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def resolved(ctx: PruneContext, hp: ChitaHparams, lowest_sparsity: float) -> ChitaHparams:
    """--solver auto: iht (backsolve for a structured budget; iht for chita++'s paper steps) where G fits
    --max-memory, else block; --block-size auto: for the block solver the widest of BLOCK_SIZES whose plan fits
    (the narrowest when none does, which the memory check then refuses, naming the knobs)."""
    def fits(candidate: ChitaHparams) -> bool:
        return _memory_plan(ctx, candidate, lowest_sparsity).needed <= hp.max_memory * GIB

    if hp.solver == AUTO:
        paper = isinstance(hp, ChitaPlusPlusHparams) and hp.intermediate == "paper"
        whole = "iht" if ctx.budget.structure == "unstructured" or paper else "backsolve"
        hp = replace(hp, solver=whole if paper or fits(replace(hp, solver=whole)) else "block")
    if hp.block_size == AUTO:
        sizes = BLOCK_SIZES if hp.solver == "block" else BLOCK_SIZES[:1]
        hp = replace(hp, block_size=next((size for size in sizes if fits(replace(hp, block_size=size))), sizes[-1]))
    return hp


@dataclass
class MemoryPlan:
    method: str  # what the refusal names
    parts: dict[str, int]
    knobs: str  # the settings that lower the estimate
    apart: tuple[str, ...] = ()  # phases never held at once

    @property
    def needed(self) -> int:
        return memory_needed(self.parts, self.apart)


def _memory_plan(ctx: PruneContext, hp: ChitaHparams, lowest_sparsity: float) -> MemoryPlan:
    """What the concrete solver holds at its peak, for the widest stage (at `lowest_sparsity`)."""
    n, p = hp.fisher_samples, sum(t.numel for t in ctx.targets)
    dtype = PRECISIONS[hp.precision]
    if hp.solver == "block":
        method = f"chita (block solver, n={n}, p={p}, block size {hp.block_size})"
        if accumulates(hp):
            return MemoryPlan(method, _accumulated_parts(hp, ctx)[0], "--block-size or --precision float32",
                              ACCUMULATED_PHASES)
        return MemoryPlan(method, streamed_parts(ctx.targets, hp, _block_fixed_parts(hp, ctx), dtype),
                          f"--fisher-samples (n={n}), --precision float32 or --block-size")
    most, fewest = (p - round(sparsity * p) for sparsity in (lowest_sparsity, ctx.sparsity))
    # A refit multiplies G's kept columns a chunk at a time in float64 (two chunk buffers) and factorises n×n (or
    # kept×kept) systems; the IHT copies its active set's columns, unless that is all of them. The gradient pass
    # and the solve are phases: the calls are freed before the solve.
    side = min(n, most)
    solve = matrix_bytes(n, FLOAT64_COLUMNS, torch.float64) + matrix_bytes(n, FLOAT64_COLUMNS, dtype) + \
        3 * matrix_bytes(side, side, torch.float64)
    if hp.solver == "iht":
        solve += matrix_bytes(n, _widest_active_set(p, most, fewest), dtype)
    parts = {"G": matrix_bytes(n, p, dtype), "gradient calls": gradient_call_bytes(hp, p, None, ctx.example_activations),
             "solve": solve}
    return MemoryPlan(f"chita ({hp.solver} solver, n={n}, p={p})", parts,
                      f"--fisher-samples (n={n}), --precision float32 or --solver block", WHOLE_PHASES)


WHOLE_PHASES = ("gradient calls", "solve")


def _widest_active_set(p: int, most: int, fewest: int) -> int:
    """The most columns the IHT's active set copies at a stage keeping between `fewest` and `most` weights: the
    start's support and ACTIVE_SET_WIDTH × k more, no copy when that is every column."""
    def width(kept: int) -> int:
        return math.ceil((1 + ACTIVE_SET_WIDTH) * kept)
    if width(most) < p:
        return width(most)
    return p - 1 if width(fewest) < p else 0


def _install(ctx: PruneContext, layout: WeightLayout, w: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
    """Write the solved weights; a model that already has masks gets the new ones (the next stage computes with them)."""
    layout.write(ctx.targets, w)
    if any(mask_of(t.module) is not None for t in ctx.targets):
        attach_masks(ctx.model, masks, MASKED)
