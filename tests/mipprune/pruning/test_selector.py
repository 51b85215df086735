"""ChannelSelector: validation, fitting on the digits CNN, support, report, pruning, reconstruction."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from rich.table import Table
from torch import nn

from mipprune.data import make_loader
from mipprune.pruning.selector import ChannelSelector, NotFittedError
from mipprune.train import count_flops, count_params, evaluate, predict, train_digits_cnn
from solvers.errors import InvalidInputError, MipPruneError

CONSUMERS = ["3", "8", "10"]  # digits_cnn: conv 0→3, conv 3→linear 8 (after flatten), linear 8→10


@pytest.fixture(scope="module")
def setup():
    model, data = train_digits_cnn(seed=0, epochs=3)
    calib = make_loader(data.x_train[:512], batch_size=256)
    return model, data, calib


@pytest.fixture(scope="module")
def fitted_magnitude(setup):
    model, _, calib = setup
    return ChannelSelector("magnitude", sparsity=0.5).fit(model, calib)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("sparsity", [0, 1, 1.5, -0.2])
def test_sparsity_out_of_range_is_rejected(sparsity):
    with pytest.raises(InvalidInputError, match=rf"sparsity must be in \(0, 1\); got {sparsity}"):
        ChannelSelector(sparsity=sparsity)


def test_constructor_messages():
    with pytest.raises(InvalidInputError, match="exactly one of sparsity .*, k .*, flops or params .* must be given; "
                                                "got sparsity and k"):
        ChannelSelector(sparsity=0.5, k={"3": 4})
    with pytest.raises(InvalidInputError, match="exactly one of sparsity .* must be given; got none"):
        ChannelSelector()
    with pytest.raises(InvalidInputError, match="exactly one of sparsity .* must be given; got flops and params"):
        ChannelSelector(flops=0.5, params=0.5)
    with pytest.raises(InvalidInputError, match=r"method must be one of \[.*'lasso'.*\]; got 'nope'"):
        ChannelSelector("nope", sparsity=0.5)
    with pytest.raises(InvalidInputError, match=r"k\['3'\] must be an integer >= 1; got 0"):
        ChannelSelector(k={"3": 0})
    with pytest.raises(InvalidInputError, match="positions must be an integer >= 1; got 0"):
        ChannelSelector(sparsity=0.5, positions=0)
    assert isinstance(ChannelSelector(sparsity=0.5), ChannelSelector)


def test_not_fitted_errors_before_fit(setup):
    sel = ChannelSelector("magnitude", sparsity=0.5)
    assert issubclass(NotFittedError, MipPruneError) and issubclass(NotFittedError, AttributeError)
    for call in (lambda: sel.get_support("3"), lambda: sel.prune(setup[0]), sel.report, sel.report_rows):
        with pytest.raises(NotFittedError, match=r"not fitted yet; call fit\(model, data\) first"):
            call()


def test_bad_k_and_data_are_rejected_at_fit(setup):
    model, _, calib = setup
    with pytest.raises(InvalidInputError, match=r"k keys must be prunable layers \(consumer names \['3', '8', '10'\]"
                                                r".*; got 'nope'"):
        ChannelSelector("magnitude", k={"nope": 2}).fit(model, calib)
    with pytest.raises(InvalidInputError, match=r"k\['3'\] must satisfy 1 <= k <= 16 .*; got 17"):
        ChannelSelector("magnitude", k={"3": 17}).fit(model, calib)
    with pytest.raises(InvalidInputError, match="data must yield at least one batch; got an empty iterable"):
        ChannelSelector("magnitude", sparsity=0.5).fit(model, [])
    with pytest.raises(InvalidInputError, match="model must be a torch.nn.Module; got str"):
        ChannelSelector("magnitude", sparsity=0.5).fit("model", calib)


def test_calibration_data_errors_name_the_calibration_data(setup):
    """Wrong shapes and NaN/inf are told in terms of the data the user passed, not internals."""
    model, data, _ = setup
    with pytest.raises(InvalidInputError, match=r"calibration batch 0 has shape \(8, 3, 5, 5\); the model expects "
                                                r"\(N, 1, H, W\) images \(its first Conv2d, '0', has 1 input "
                                                r"channel\)"):
        ChannelSelector("lasso", sparsity=0.5).fit(model, [torch.randn(8, 3, 5, 5)])
    with pytest.raises(InvalidInputError, match=r"calibration batch 1 has shape \(4, 64\)"):
        ChannelSelector("magnitude", sparsity=0.5).fit(model, [data.x_train[:4], data.x_train[:4].reshape(4, 64)])
    for bad in (float("nan"), float("inf")):
        x = data.x_train[:64].clone()
        x[5, 0, 2, 2] = bad
        with pytest.raises(InvalidInputError, match=r"calibration data contains NaN/inf: batch 0 \(shape "
                                                    r"\(64, 1, 8, 8\)\) has 1 non-finite entry"):
            ChannelSelector("lasso", sparsity=0.5).fit(model, [x])


# ------------------------------------------------------------------------------- fitting
def test_sparsity_keeps_exactly_k_per_group_and_leaves_model_untouched(setup, fitted_magnitude):
    model, data, calib = setup
    sel = fitted_magnitude
    assert [g.consumer for g in sel.groups_] == CONSUMERS
    assert {c: int(sel.get_support(c).sum()) for c in CONSUMERS} == {"3": 8, "8": 16, "10": 32}
    assert np.array_equal(sel.get_support("0"), sel.get_support("3"))  # the producer names the group too
    with pytest.raises(InvalidInputError, match=r"layer must be a prunable layer \(consumer names \['3', '8', '10'\]"):
        sel.get_support("1")
    # fitting again on a model in train mode: weights, BN statistics and mode all unchanged
    m = copy.deepcopy(model).train()
    before = _state(m)
    ChannelSelector("magnitude", sparsity=0.75).fit(m, calib)
    assert _same_state(m, before) and all(mod.training for mod in m.modules())


def test_k_dict_prunes_only_named_groups(setup):
    model, data, calib = setup
    sel = ChannelSelector("magnitude", k={"0": 5, "10": 7}).fit(model, iter(list(calib)))  # one-shot iterator
    assert int(sel.get_support("3").sum()) == 5 and int(sel.get_support("10").sum()) == 7
    assert sel.get_support("8").all()  # not named: left whole
    assert [r["layer"] for r in sel.report_rows()] == ["3", "10"]
    pruned = sel.prune(model)
    assert pruned[0].out_channels == 5 and pruned[3].in_channels == 5 and pruned[8].out_features == 7
    assert pruned[3].out_channels == 32


def test_prune_returns_smaller_working_copy(setup, fitted_magnitude):
    model, data, calib = setup
    before = _state(model)
    pruned = fitted_magnitude.prune(model)
    again = fitted_magnitude.prune(model)
    assert pruned is not again and pruned is not fitted_magnitude.pruned_model_
    assert _same_state(model, before)
    assert pruned(data.x_test[:4]).shape == (4, 10)
    assert count_params(pruned) < 0.3 * count_params(model)
    assert count_flops(pruned, (1, 8, 8)) < 0.3 * count_flops(model, (1, 8, 8))
    # another model of the same architecture goes through surgery and gives the same network
    replay = fitted_magnitude.prune(copy.deepcopy(model))
    torch.testing.assert_close(predict(replay, data.x_test), predict(pruned, data.x_test))
    with pytest.raises(InvalidInputError, match="model must have the prunable groups of the fitted one"):
        fitted_magnitude.prune(nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10)))
    with pytest.raises(InvalidInputError, match=r"model must have the architecture of the fitted one and take its "
                                                r"calibration input \(one sample of shape \(1, 1, 8, 8\)\)"):
        fitted_magnitude.prune(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)))


def test_report_table_and_rows(fitted_magnitude):
    table = fitted_magnitude.report()
    assert isinstance(table, Table) and table.row_count == 3
    assert [c.header for c in table.columns] == ["layer", "type", "kept", "rel. error", "no refit", "bound", "gap",
                                                 "time s", "status"]
    rows = fitted_magnitude.report_rows()
    assert [(r["kept"], r["total"]) for r in rows] == [(8, 16), (16, 32), (32, 64)]
    for r in rows:
        assert 0 <= r["rel_error"] <= r["error_no_refit"] + 1e-9  # the refit never hurts on calibration data
        assert r["status"] == "feasible" and r["bound"] is None and r["method"] == "magnitude"


def test_report_prints_as_a_table_with_print_and_with_rich(fitted_magnitude, capsys):
    import rich

    rows = fitted_magnitude.report_rows()
    print(fitted_magnitude.report())
    out = capsys.readouterr().out
    assert "<rich.table" not in out and "…" not in out and "\x1b[" not in out   # plain text, nothing cut
    lines = out.splitlines()
    assert any(ln.split("┃")[1:4] == [" layer ", " type   ", "  kept "] for ln in lines)
    for r in rows:   # one table row per layer: name, type, kept/total, status, cells separated by │
        cells = next(ln for ln in lines if ln.startswith(f"│ {r['layer']} ")).split("│")[1:-1]
        assert [c.strip() for c in cells[:3]] == [r["layer"], r["type"], f"{r['kept']}/{r['total']}"]
        assert cells[-1].strip() == r["status"] and cells[3].strip() == f"{r['rel_error']:.4f}"
    assert str(fitted_magnitude.report()) == out.rstrip("\n")
    rich.print(fitted_magnitude.report())   # rich still renders it as its own table
    rich_out = capsys.readouterr().out
    assert "Channel selection" in rich_out and "layer" in rich_out and "<rich.table" not in rich_out


def test_sequential_lasso_reconstruction_beats_mask_only(setup):
    model, data, calib = setup
    sel = ChannelSelector("lasso", sparsity=0.5, positions=8).fit(model, calib)
    test = (data.x_test, data.y_test)
    rebuilt, masked = sel.prune(model), sel.prune(model, reconstruct=False)
    dense_logits = predict(model, data.x_test)

    def out_err(m):
        return float(((predict(m, data.x_test) - dense_logits) ** 2).sum() / (dense_logits ** 2).sum())

    assert out_err(rebuilt) < 0.5 * out_err(masked)
    acc_rebuilt, acc_masked = evaluate(rebuilt, test), evaluate(masked, test)
    assert acc_rebuilt > acc_masked and acc_rebuilt >= evaluate(model, test) - 0.05
    assert all(r["method"] == "lasso" for r in sel.report_rows())


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("method,n", [("lasso", 1), ("lasso", 512), ("greedy", 1), ("exact", 512)])
def test_default_paths_print_no_third_party_warning(setup, method, n):
    """cvxpy's "Solution may be inaccurate" (dead channels: LASSO cannot reach k, λ → 0) and scipy's
    LinAlgWarning (one sample: singular statistics) are handled, not shown; any warning fails here."""
    model, data, _ = setup
    sel = ChannelSelector(method, sparsity=0.5, time_limit=5 if method == "exact" else None)
    sel.fit(model, [data.x_train[:n]])
    assert [int(sel.get_support(c).sum()) for c in CONSUMERS] == [8, 16, 32]
    if method == "lasso":
        infos = [sel.results_[c].info for c in CONSUMERS]
        assert all(i["inaccurate_solves"] == 0 for i in infos)
        # the last layer has dead ReLU channels: fewer than 32 survive even at the smallest λ
        assert infos[-1]["lambda_floor"] and not infos[-1]["exact_count"]


def test_one_shot_mode_and_tensor_batches(setup):
    model, data, _ = setup
    batches = [data.x_train[:600], data.x_train[600:1200]]  # plain tensors, no labels
    sel = ChannelSelector("random", sparsity=0.25, sequential=False, seed=3).fit(model, batches)
    assert [int(sel.get_support(c).sum()) for c in CONSUMERS] == [12, 24, 48]
    assert sel.prune(model)(data.x_test[:2]).shape == (2, 10)


def test_exact_gets_a_default_time_limit_and_others_none():
    from mipprune.pruning.selector import EXACT_DEFAULT_TIME_LIMIT

    assert ChannelSelector("exact", sparsity=0.5).time_limit == EXACT_DEFAULT_TIME_LIMIT == 60.0
    assert ChannelSelector("exact", sparsity=0.5, time_limit=3).time_limit == 3
    assert ChannelSelector("lasso", sparsity=0.5).time_limit is None


def test_method_options_reach_every_groups_exact_selection_and_are_checked_up_front(setup):
    model, _, calib = setup
    sel = ChannelSelector("exact", k={"3": 6, "8": 8}, time_limit=5,
                          method_options={"warm_start": False, "lasso": False}).fit(model, calib)
    for name in ("3", "8"):
        incumbents = sel.results_[name].info.get("incumbents", {})
        # (without the warm start no greedy / backward / swap incumbent is recorded)
        assert not {"greedy", "backward", "swap", "lasso"} & set(incumbents), incumbents
    default = ChannelSelector("exact", k={"3": 6}, time_limit=5).fit(model, calib)
    assert {"greedy", "backward"} & set(default.results_["3"].info["incumbents"])
    with pytest.raises(InvalidInputError, match=r"method 'exact' takes no option 'threads'"):
        ChannelSelector("exact", sparsity=0.5, method_options={"threads": 2})
    with pytest.raises(InvalidInputError, match=r"method_options are keyword arguments of a solver method .*'l1' "
                                                r"takes none"):
        ChannelSelector("l1", sparsity=0.5, method_options={"workers": 2})
    assert ChannelSelector("l1", sparsity=0.5, method_options={}).method_options == {}
