"""CHITA: pruning as ℓ0-constrained least squares on the low-rank empirical Fisher.

Benbaki, Chen, Meng, Hazimeh, Ponomareva, Zhao, Mazumder, "Fast as CHITA: Neural Network Pruning
with Combinatorial Optimization", ICML 2023 (arXiv:2302.14623); notes in methods.md §2.

Around the current weights w̄ the loss is modelled with n gradients, the rows of G, as the
empirical Fisher (1/n)GᵀG. Scaled by n, with a ridge, the pruning problem becomes

    minimise  ½‖G(w̄ − w)‖² + λ'‖w − w̄‖² + αᵀw   subject to  ‖w‖₀ ≤ k
    λ' = λn/2,   α = Gᵀ1 / B with the first-order term (B examples per gradient), else 0

and the weights after pruning are the solver's, not the original ones (OBS's weight update,
for many weights jointly). Solvers (`--solver`):
- `iht` (default): the active-set IHT with exact line search (the paper's Alg. 3–4) from one IHT
  step from w̄, then an exact refit on the support it found and IHT steps between exact refits
  (hard thresholding pursuit). The line-searched steps converge slowly on an ill-conditioned G and
  rarely swap weights; from a refit, where the gradient on the support is zero, one step can.
  Every refit is the exact minimiser on its support, so each only lowers the objective.
- `backsolve` (CHITA-BSO, Alg. 5): magnitude support (or one line-searched gradient step when the
  first-order term is on), then the closed-form ridge refit on that support via Woodbury.
- `block` (Alg. 6): the backsolve under a block-diagonal Fisher, for models too large for one G
  solve; under an unstructured budget followed by the same pursuit, on that block-diagonal model
  (each block's Hessian formed once), since the paper's magnitude support is what loses most there.
`chita++` solves at a rising sequence of sparsities, recomputing G at the current weights each
stage (Alg. 1); `chita-gradual` interleaves CHITA prune events with SGD fine-tuning (§2.3).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..budgets import check_sparsity
from ..errors import PrunekitError
from ..fisher import (
    PRECISIONS,
    FisherHparams,
    GradientMatrix,
    WeightLayout,
    block_slices,
    fisher_examples,
    gradient_call_bytes,
    gradient_matrix,
    matrix_bytes,
    require_memory,
)
from ..masks import MASKED, attach_masks, mask_of
from ..schedules import STAGE_SCHEDULES, stage_sparsities
from ..training import TrainConfig, Trainer
from . import PruneContext, register
from ._chita_solvers import (
    ACTIVE_SET_WIDTH,
    BlockFits,
    FullFits,
    Iterate,
    Pools,
    Quadratic,
    active_set_iht,
    block_backsolve,
    iterate_at,
    refit_pursuit,
)

SOLVERS = ("iht", "backsolve", "block")


@dataclass
class ChitaHparams(FisherHparams):
    """One CHITA solve: the local model (n, ridge, first-order term) and the solver."""

    ridge: float = field(default=1e-4, metadata={
        "help": "λ: ridge keeping the solution near the current weights (λ' = λ·n/2 in the objective); > 0"})
    first_order: bool = field(default=False, metadata={
        "help": "keep the gradient term of the local model (off: OBS-style, gradient taken as 0 at a trained model); "
                "the ridge then also bounds the step along the gradient, so it usually needs a larger --ridge"})
    solver: str = field(default="iht", metadata={
        "help": "iht: active-set IHT with line search; backsolve: magnitude support + ridge refit; "
                "block: backsolve under a block-diagonal Fisher (large models)"})
    block_size: int = field(default=500, metadata={
        "help": "block solver: tensors of at least this many weights are cut into blocks of about this size"})
    iterations: int = field(default=100, metadata={"help": "iht: IHT steps per active-set round"})
    active_set_rounds: int = field(default=10, metadata={"help": "iht: times the active set may grow"})
    pursuit_rounds: int = field(default=10, metadata={
        "help": "iht and block: rounds of IHT step + exact refit after the start, each swapping weights while the "
                "objective falls (0: off; block: unstructured budgets only)"})
    tolerance: float = field(default=1e-7, metadata={
        "help": "iht: stop when a step lowers the objective by less than this fraction"})
    precision: str = field(default="float64", metadata={
        "help": "float64 | float32: how G is stored and the IHT computed (float32 halves the memory)"})

    def validate(self) -> None:
        FisherHparams.validate(self)
        if not self.ridge > 0 or not math.isfinite(self.ridge):
            raise PrunekitError(f"ridge must be a finite number > 0, got {self.ridge!r} (e.g. --ridge 1e-4); "
                                "without it the refit is singular when n < kept weights")
        if self.solver not in SOLVERS:
            raise PrunekitError(f"solver {self.solver!r} is unknown; use one of {', '.join(SOLVERS)}")
        if self.precision not in PRECISIONS:
            raise PrunekitError(f"precision {self.precision!r} is unknown; use float64 or float32")
        for name in ("block_size", "iterations", "active_set_rounds"):
            if getattr(self, name) < 1:
                raise PrunekitError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.pursuit_rounds < 0:
            raise PrunekitError(f"pursuit_rounds must be >= 0, got {self.pursuit_rounds!r}")
        if not 0 <= self.tolerance < 1:
            raise PrunekitError(f"tolerance must be in [0, 1), got {self.tolerance!r}")


@dataclass
class ChitaPlusPlusHparams(ChitaHparams):
    """CHITA++: several CHITA solves at rising sparsities, G recomputed at the current weights each stage."""

    stages: int = field(default=20, metadata={"help": "number of stages (the last one is at the target sparsity)"})
    schedule: str = field(default="exponential", metadata={
        "help": f"stage sparsities from --base to the target: {', '.join(STAGE_SCHEDULES)}"})
    base: float = field(default=0.1, metadata={"help": "sparsity of the schedule's first stage (below the target)"})

    def validate(self) -> None:
        ChitaHparams.validate(self)
        check_sparsity(self.base, "chita++ base")
        if self.stages < 1:
            raise PrunekitError(f"stages must be >= 1, got {self.stages!r}")
        if self.schedule not in STAGE_SCHEDULES:
            raise PrunekitError(f"schedule {self.schedule!r} is unknown; use one of {', '.join(STAGE_SCHEDULES)}")


@dataclass
class ChitaGradualHparams(ChitaHparams, TrainConfig):
    """CHITA prune events on a cubic schedule with SGD fine-tuning in between (the paper's gradual recipe)."""

    events: int = field(default=7, metadata={"help": "pruning events (the last one reaches the target)"})
    prune_every: int = field(default=12, metadata={
        "help": "epochs of fine-tuning after each event but the last, one cosine LR cycle each"})
    outer_base: float = field(default=0.5, metadata={"help": "sparsity of the first event"})
    inner_stages: int = field(default=1, metadata={
        "help": "CHITA++ stages per event, from the previous event's sparsity"})
    # The recipe's own values where they differ from the one-shot and training defaults.
    epochs: int = field(default=100, metadata={"help": "total epochs, events included (the last segment is the rest)"})
    weight_decay: float = field(default=3.75e-5, metadata={"help": "L2 penalty of the fine-tuning SGD (>= 0)"})
    fisher_samples: int = field(default=500, metadata={"help": "n: gradients in the empirical Fisher per event"})
    fisher_batch: int = field(default=16, metadata={"help": "examples averaged into each gradient"})
    solver: str = field(default="block", metadata={"help": "iht | backsolve | block (the recipe uses block)"})

    def validate(self) -> None:
        ChitaHparams.validate(self)
        TrainConfig.validate(self)
        for name in ("events", "prune_every", "inner_stages"):
            if getattr(self, name) < 1:
                raise PrunekitError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.epochs <= self.prune_every * (self.events - 1):
            raise PrunekitError(f"{self.events} events every {self.prune_every} epochs leave no epoch after the "
                                f"last one within --epochs {self.epochs}; raise --epochs or lower --events")
        check_sparsity(self.outer_base, "chita-gradual outer_base")


# ---------------------------------------------------------------- methods

@register("chita", ChitaHparams, "CHITA (Benbaki et al. 2023): ℓ0-constrained least squares on the empirical Fisher; "
          "weights re-solved, not just masked", needs_data=True)
def chita(ctx: PruneContext, hp: ChitaHparams) -> dict[str, torch.Tensor]:
    return solve_stages(ctx, hp, [ctx.sparsity])


@register("chita++", ChitaPlusPlusHparams, "CHITA++: CHITA at rising sparsities, the Fisher recomputed at each stage",
          needs_data=True)
def chita_plus_plus(ctx: PruneContext, hp: ChitaPlusPlusHparams) -> dict[str, torch.Tensor]:
    if hp.base > ctx.sparsity:
        raise PrunekitError(f"chita++ --base {hp.base} is above the target sparsity {ctx.sparsity}; lower --base")
    return solve_stages(ctx, hp, stage_sparsities(ctx.sparsity, hp.stages, hp.schedule, hp.base))


@register("chita-gradual", ChitaGradualHparams, "CHITA prune events on a cubic schedule with SGD fine-tuning, "
          "momentum reset and cosine LR restarts in between", needs_data=True)
def chita_gradual(ctx: PruneContext, hp: ChitaGradualHparams) -> dict[str, torch.Tensor]:
    if hp.outer_base > ctx.sparsity:
        raise PrunekitError(f"chita-gradual --outer-base {hp.outer_base} is above the target sparsity "
                            f"{ctx.sparsity}; lower --outer-base")
    event_sparsities = stage_sparsities(ctx.sparsity, hp.events, "cubic", hp.outer_base)
    check_before_work(ctx, hp, min(event_sparsities))
    previous, epoch = 0.0, 0
    for event, sparsity in enumerate(event_sparsities):
        inner = stage_sparsities(sparsity, hp.inner_stages, "exponential", base=previous)
        masks = solve_stages(ctx, hp, inner)
        attach_masks(ctx.model, masks, MASKED)
        last = event == hp.events - 1
        epochs = hp.epochs - epoch if last else hp.prune_every
        # A fresh Trainer per segment: new optimizer (momentum reset) and a new cosine cycle (LR restart).
        config = TrainConfig(**{**_train_fields(hp), "epochs": epochs, "seed": ctx.seed + event})
        history = Trainer(ctx.model, _FromEpoch(ctx.data, epoch), config, device=ctx.device, progress=False).fit()
        epoch += epochs
        ctx.record(event=event, sparsity=sparsity, epochs=epoch, train_accuracy=history[-1]["train_accuracy"],
                   train_loss=history[-1]["train_loss"])
        previous = sparsity
    return masks


# ---------------------------------------------------------------- one or more CHITA solves

def solve_stages(ctx: PruneContext, hp: ChitaHparams, sparsities: list[float]) -> dict[str, torch.Tensor]:
    """CHITA at each sparsity in turn, each around the weights the previous one left (G recomputed)."""
    check_before_work(ctx, hp, min(sparsities))
    layout = WeightLayout.of(ctx.targets)
    for stage, sparsity in enumerate(sparsities):
        # Each stage takes the next examples the data gives (a shuffling loader gives new ones each pass).
        inputs, labels = fisher_examples(ctx.data, hp.fisher_samples * hp.fisher_batch)
        inputs, labels = inputs.to(ctx.device), labels.to(ctx.device)
        g = gradient_matrix(ctx.model, ctx.targets, inputs, labels, batch=hp.fisher_batch, chunk=hp.fisher_chunk,
                            dtype=PRECISIONS[hp.precision], meter=ctx.meter)
        anchor = layout.flatten({t.name: t.weight for t in ctx.targets}).to(g.rows.dtype)
        solution, trace, swapped = solve(ctx, hp, g, anchor, sparsity)
        masks = ctx.select(layout.unflatten(solution.support.to(torch.float32)), sparsity)
        _install(ctx, layout, solution.w, masks)
        ctx.record(stage=stage, sparsity=sparsity, solver=hp.solver, objective=trace, swapped=swapped,
                   revived=int((solution.support & (anchor == 0)).sum()))
    return masks


def solve(ctx: PruneContext, hp: ChitaHparams, g: GradientMatrix, anchor: torch.Tensor,
          sparsity: float) -> tuple[Iterate, list[float], int]:
    """The solver's weights and support at `sparsity`, the objective at the start and after each step,
    and how many weights the solution keeps that the start (magnitude, or one gradient step) did not."""
    q = Quadratic.on_columns(g.rows, anchor, hp.ridge * g.n / 2,
                             g.gradient_sum() / g.batch if hp.first_order else None)
    lipschitz = q.lipschitz(ctx.generator()) if hp.first_order or hp.solver == "iht" else 0.0
    # The start, H_k(w̄ − α/L), is one IHT step from w̄ (where ∇f = α): magnitude pruning when α = 0.
    first_step = anchor if q.linear is None else anchor - q.linear / lipschitz
    start = g.layout.flatten(ctx.select(g.layout.unflatten(first_step.abs()), sparsity))
    start_point = iterate_at(q, first_step * start, start)
    trace = [start_point.value]
    if hp.solver == "iht":
        pools = Pools.from_budget(ctx.budget, g.layout, sparsity)
        support = active_set_iht(q, pools, start_point, pools.widened(first_step, ACTIVE_SET_WIDTH),
                                 iterations=hp.iterations, rounds=hp.active_set_rounds, tolerance=hp.tolerance,
                                 lipschitz=lipschitz, trace=trace).support
        solution = refit_pursuit(FullFits(q, sum(pools.keep)), pools, support, hp.pursuit_rounds, trace)
    elif hp.solver == "block":
        blocks = block_slices(g.layout, hp.block_size)
        if _block_pursuit(ctx, hp):
            # The pursuit's objective is the block-diagonal one: its values stay out of the trace of f.
            found = refit_pursuit(BlockFits(g.rows, anchor, blocks, q.ridge, q.linear),
                                  Pools.from_budget(ctx.budget, g.layout, sparsity), start, hp.pursuit_rounds, [])
            w, support = found.w, found.support
        else:
            w, support = block_backsolve(g.rows, anchor, start, blocks, q.ridge, q.linear), start
        solution = iterate_at(q, w.to(anchor.dtype), support)
        trace.append(solution.value)
    else:
        solution = iterate_at(q, q.refit(start), start)
        trace.append(solution.value)
    return solution, trace, int((solution.support & ~start).sum())


def _block_pursuit(ctx: PruneContext, hp: ChitaHparams) -> bool:
    """The block solver swaps single weights only under an unstructured budget (groups stay as selected)."""
    return hp.solver == "block" and hp.pursuit_rounds > 0 and ctx.budget.structure == "unstructured"


def check_before_work(ctx: PruneContext, hp: ChitaHparams, lowest_sparsity: float) -> None:
    """The solver suits the budget, and the memory estimate for the widest stage is within --max-memory."""
    if hp.solver == "iht" and ctx.budget.structure != "unstructured":
        raise PrunekitError(f"chita's iht solver selects single weights; for {ctx.budget.structure} sparsity "
                            "use --solver backsolve or --solver block")
    n, p = hp.fisher_samples, sum(t.numel for t in ctx.targets)
    kept = p - round(lowest_sparsity * p)
    dtype = PRECISIONS[hp.precision]
    # A refit holds G's kept columns in float64 and an n×n (or kept×kept) system.
    refit_width = min(p, 2 * hp.block_size) if hp.solver == "block" else kept
    side = min(n, refit_width)
    parts = {"G": matrix_bytes(n, p, dtype), "gradient calls": gradient_call_bytes(hp, p),
             "refit": matrix_bytes(n, refit_width, torch.float64) + matrix_bytes(side, side, torch.float64)}
    if hp.solver == "iht":
        parts["active set"] = matrix_bytes(n, min(p, math.ceil(ACTIVE_SET_WIDTH * kept) + kept), dtype)
    if _block_pursuit(ctx, hp):
        sizes = [b.stop - b.start for b in block_slices(WeightLayout.of(ctx.targets), hp.block_size)]
        parts["block Hessians"] = sum(matrix_bytes(size, size, torch.float64) for size in sizes)
    require_memory(f"chita ({hp.solver} solver, n={n}, p={p})", parts, hp,
                   f"--fisher-samples (n={n}), --precision float32 or --solver block with a smaller --block-size")


def _install(ctx: PruneContext, layout: WeightLayout, w: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
    """Write the solved weights; a model that already has masks gets the new ones (the next stage computes with them)."""
    layout.write(ctx.targets, w)
    if any(mask_of(t.module) is not None for t in ctx.targets):
        attach_masks(ctx.model, masks, MASKED)


def _train_fields(hp: TrainConfig) -> dict:
    return {f.name: getattr(hp, f.name) for f in dataclasses.fields(TrainConfig)}


class _FromEpoch:
    """The training data seen from a later epoch: each segment's Trainer counts epochs from 0,
    so without the shift every segment would replay the same shuffles."""

    def __init__(self, data, first_epoch: int) -> None:
        self.data, self.first_epoch = data, first_epoch

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.first_epoch + epoch)
