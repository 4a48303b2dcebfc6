"""Fisher merging (Matena & Raffel, NeurIPS 2022): θ = Σ_t w_t F_t ⊙ θ_t / Σ_t w_t F_t entry by entry, F_t the diagonal
Fisher of expert t on its own task (cached; gradient matching shares it); buffers are averaged. FusionBench's defaults:
`min_fisher` is added to every entry; `normalize`: w_t ∝ 1 / ‖F_t‖, so no expert dominates everywhere (else w_t = 1,
the paper's); `labels` drawn from each expert's predictions ("sampled": the true Fisher's estimate) or "empirical"."""
from dataclasses import dataclass

from mergebench_core import hookimpl
from mergebench_core.data.statistic_merge import StatisticMerge, StatisticParams
from mergebench_core.engine.averaging import inverse_norm_weights, normalized, weighted_mean


@dataclass
class Params(StatisticParams):
    min_fisher: float = 1e-6
    normalize: bool = True
    labels: str = "sampled"
    choices = {"labels": ("sampled", "empirical")}
    at_least = {"min_fisher": 0.0}


class FisherMerging(StatisticMerge):
    """Average the experts entry by entry, each weighted by its diagonal Fisher on its own task."""
    name = "fisher"
    Params = Params

    def statistic(self, run, model, expert, task):
        return run.fisher(expert, task, self.params.labels)

    def prepare(self, run, model, stats):
        p = self.params
        self.weights = inverse_norm_weights(stats, p.min_fisher) if p.normalize else normalized([1.0] * len(stats))
        return {"model_weights": dict(zip(run.experts, self.weights))}

    def merge_tensor(self, key, tensors, fishers, base):
        return weighted_mean(tensors, [f.float() + self.params.min_fisher for f in fishers], self.weights)


@hookimpl
def register_methods(register):
    register(FisherMerging)
