"""RegMean++ (Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model
Merging", 2025).

RegMean merges each Linear layer from Gram matrices of the inputs that layer sees inside each *expert*. RegMean++
instead takes the inputs from the *merged* model: layers are merged in forward order, and the Gram matrix G_t of
layer l is computed by running task t's training data through the merged model, whose layers before l are already
merged. So each layer is fitted to the activations it will actually receive, carrying dependencies across layers.
The closed form per layer, the off-diagonal scaling and the treatment of every other tensor are RegMean's
(see mergebench-regmean, whose functions this plugin reuses).

Convolutions (Conv1d/Conv2d, groups = 1) are merged like Linear layers, on their kernels' matrix views with Grams of
the unfolded input patches (see mergebench-regmean).

Granularity: the paper and FusionBench merge a transformer block at a time (the linear layers inside one block see
inputs from the merged previous blocks and each expert's own block); here every Linear layer is its own step,
which needs no knowledge of the architecture and is the same thing for models made of single-layer blocks.
The statistics depend on the merge so far, so they are not cached; each step runs the forward only up to the layer
being merged.

Defaults (FusionBench's CLIP configuration, as for RegMean): `n_examples` = 256,
`reduce_non_diagonal_ratio` = 0.95, `exclude_param_names_regex` = [].
"""

from __future__ import annotations

from mergebench_core import MergeOutput, hookimpl
from mergebench_core.data.statistic_merge import StatisticRun
from mergebench_core.data.statistics import forward_order, gram_convolutions, linear_input_grams, weight_is_transposed
from mergebench_regmean import Params, RegMean, regmean_weight, weight_key


class RegMeanPlusPlus(RegMean):
    """RegMean with each layer's Gram matrices taken from the merged model's own activations, layer by layer."""

    name = "regmean_pp"
    Params = Params

    def merge(self, run: StatisticRun) -> MergeOutput:
        p, taskpool = self.params, run.taskpool
        states = [run.pool.state_dict(e) for e in run.experts]
        model = run.pool.load_model(run.base_name)
        # start from the plain average (RegMean with no Linear layers), then replace Linear weights in forward order
        merged, _ = self.merge_states(states, [{} for _ in states], base=run.pool.state_dict(run.base_name),
                                      refused=self.refused(model), fallbacks=run.fallbacks)
        model.load_state_dict(merged)
        model.to(run.ctx.device)
        convs = bool(gram_convolutions(model)[0])
        order = forward_order(model, taskpool, run.tasks[0], convolutions=convs)
        regressed = []
        for layer in run.ctx.track(order, desc="regmean++ layers", total=len(order)):
            key = weight_key(layer)
            if self.kept(key) or key not in states[0]:
                continue  # a weight tied to another tensor (an LM head tied to the embedding) is merged as that one
            grams = [linear_input_grams(model, taskpool, t, p.n_examples, batch_size=p.batch_size,
                                        device=run.ctx.device, modules=[layer], convolutions=convs)[layer]
                     for t in run.tasks]
            weight = regmean_weight([s[key] for s in states], grams, p.reduce_non_diagonal_ratio,
                                    transposed=weight_is_transposed(model.get_submodule(layer)))
            model.get_submodule(layer).weight.data.copy_(weight.to(run.ctx.device))
            regressed.append(key)
        return MergeOutput(model.cpu(), extras={"regressed_in_order": regressed})


@hookimpl
def register_methods(register):
    register(RegMeanPlusPlus)
