"""Git Re-Basin (Ainsworth, Hayase & Srinivasa, ICLR 2023): permute each model's units (its function unchanged) to best
match the first model's, then average (`AlignToFirst`). `matching` "weight": up to `max_iter` seeded sweeps of linear
assignments on Σ ⟨W_ref, π(W)⟩ (the paper's code); "activation": one assignment per permutation by correlation."""
from dataclasses import dataclass

from mergebench_core import hookimpl
from mergebench_core.fusion.align_to_first import AlignToFirst, permuted
from mergebench_core.fusion.alignment import activation_matching, weight_matching
from mergebench_core.fusion.fusion_run import FusionParams


@dataclass
class Params(FusionParams):
    matching: str = "weight"
    max_iter: int = 100
    choices = {"matching": ("weight", "activation")}
    at_least = {"max_iter": 1}


class GitRebasin(AlignToFirst):
    """Permute every model onto the first by weight (or activation) matching, then average the aligned weights."""
    name = "git_rebasin"
    Params = Params
    report_key = "units_moved"
    average_dtype = "float32"  # as before the base: same bits for two models, kept for three or more
    activation_values = {"matching": ("activation",)}
    data_free_hint = "git_rebasin.matching=weight"

    def describe(self):
        return {"matching": self.params.matching}

    def align(self, spec, reference, other, acts_ref, acts_other, generator):
        perms = (activation_matching(spec, acts_ref, acts_other) if self.params.matching == "activation" else
                 weight_matching(spec, reference, other, max_iter=self.params.max_iter, generator=generator))
        return permuted(spec, other, perms)


@hookimpl
def register_methods(register):
    register(GitRebasin)
