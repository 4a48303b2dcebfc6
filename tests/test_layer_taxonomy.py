"""The layer taxonomy is decided once, in `engine.roles`: the data statistics (which layers have input Grams, how
wide their inputs are) ask it rather than deciding again, and give the same answers as before."""

from __future__ import annotations

from torch import nn

from mergebench_core.data import statistics
from mergebench_core.engine import roles


def test_statistics_use_the_layer_taxonomy_of_roles():
    for name in ("linear_layers", "weight_is_transposed", "in_features"):
        assert getattr(statistics, name) is getattr(roles, name), name  # one authority, re-exported
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(6, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv3d(8, 2, 1),
                          nn.ConvTranspose2d(2, 2, 2), nn.Embedding(10, 4), nn.LayerNorm(4))
    assert [roles.weight_view(m) for m in model] == [
        roles.MatrixView("linear"), roles.MatrixView("conv"), roles.MatrixView("conv", 2), roles.MatrixView("conv"),
        None, roles.MatrixView("embedding"), None]
    assert [roles.in_features(m) for m in model[:2]] == [4, 6 * 9]
    convs, refused = statistics.gram_convolutions(model)
    assert list(convs) == ["1"]
    assert refused == {"2": "a grouped convolution (groups=2)",
                       "3": "a Conv3d (patches of 3-D inputs are not unfolded)", "4": "a transposed convolution"}
    assert list(statistics.gram_layers(model, convolutions=True)) == ["0", "1"]
    found = roles.roles_of(model)
    assert {k: r.view for k, r in found.items() if k.endswith("weight")} == {
        "0.weight": roles.MatrixView("linear"), "1.weight": roles.MatrixView("conv"),
        "2.weight": roles.MatrixView("conv", 2), "3.weight": roles.MatrixView("conv"), "4.weight": None,
        "5.weight": roles.MatrixView("embedding"), "6.weight": None}
