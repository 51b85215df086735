"""Digits data, reference models, training, evaluation, size counting and KD fine-tuning."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mipprune.data import load_digits_data, make_loader
from mipprune.models import digits_cnn, mlp
from mipprune.train import count_flops, count_params, distillation_loss, evaluate, finetune, kd_loss, train_digits_cnn
from solvers.errors import InvalidInputError


@pytest.fixture(scope="module")
def trained():
    return train_digits_cnn(seed=0, epochs=3)


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_split_is_seeded_stratified_and_scaled():
    d = load_digits_data(seed=0)
    assert d.x_train.shape == (1347, 1, 8, 8) and d.x_test.shape == (450, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) == 1.0
    assert torch.bincount(d.y_test, minlength=10).min() >= 43  # stratified: 43-46 of each class
    again, other = load_digits_data(seed=0, flat=True), load_digits_data(seed=1)
    assert again.x_train.shape == (1347, 64) and torch.equal(again.x_train.reshape(-1, 1, 8, 8), d.x_train)
    assert not torch.equal(other.y_train, d.y_train)
    with pytest.raises(InvalidInputError, match=r"test_size must be in \(0, 1\); got 1.5"):
        load_digits_data(test_size=1.5)


def test_seeded_loader_order_is_reproducible():
    x = torch.arange(100.0).reshape(100, 1)
    first = [b[0].flatten().tolist() for b in make_loader(x, batch_size=10, shuffle=True, seed=3)]
    second = [b[0].flatten().tolist() for b in make_loader(x, batch_size=10, shuffle=True, seed=3)]
    assert first == second and first[0] != list(range(10))


def test_models_have_expected_shapes():
    assert digits_cnn()(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    net = mlp((64, 20, 20, 10))
    assert net(torch.zeros(3, 64)).shape == (3, 10)
    assert sum(isinstance(m, nn.ReLU) for m in net) == 2  # no ReLU after the logits
    with pytest.raises(InvalidInputError, match="sizes must hold at least two positive widths; got"):
        mlp((64,))


def test_default_cnn_trains_to_high_accuracy_reproducibly(trained):
    model, data = trained
    acc = evaluate(model, (data.x_test, data.y_test))
    assert acc >= 0.95
    again, _ = train_digits_cnn(seed=0, epochs=3)
    assert _state_equal(model, again)  # same seed, same weights (deterministic on CPU)
    loader_acc = evaluate(model, make_loader(data.x_test, data.y_test, batch_size=33))
    assert loader_acc == pytest.approx(acc)


def test_evaluate_restores_training_mode(trained):
    model, data = trained
    m = copy.deepcopy(model).train()
    before = copy.deepcopy(m.state_dict())
    evaluate(m, (data.x_test, data.y_test))
    assert m.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN stats not updated


def test_count_flops_and_params_match_hand_computation():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                        nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
    # conv1: 4 out × 8×8 positions × 3·3·3; conv2: 6 × 3×3 × 4·3·3; linear: 5 × 54
    expected = 4 * 64 * 27 + 6 * 9 * 36 + 5 * 54
    assert count_flops(net, (3, 8, 8)) == expected
    assert count_params(net) == (4 * 27 + 4) + (6 * 36 + 6) + (5 * 54 + 5)
    grouped = nn.Conv2d(4, 8, 3, groups=2, padding=1)
    assert count_flops(grouped, (4, 5, 5)) == 8 * 25 * 2 * 9
    # the default CNN: conv 16·64·9 + conv 32·64·16·9 + fc 64·512 + fc 10·64
    assert count_flops(digits_cnn(), (1, 8, 8)) == 9216 + 294912 + 32768 + 640


def test_kd_loss_is_zero_for_identical_logits_and_mixes_ce():
    logits = torch.randn(5, 10)
    assert float(kd_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    labels = torch.arange(5)
    ce = float(nn.functional.cross_entropy(logits, labels))
    assert float(kd_loss(logits, logits, labels, alpha=0.25)) == pytest.approx(0.75 * ce, rel=1e-5)


def test_finetune_returns_new_model_and_reduces_kd_loss(trained):
    dense, data = trained
    torch.manual_seed(1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # a much smaller, untrained student
    student_before = copy.deepcopy(student)
    dense_before = copy.deepcopy(dense)
    loader = make_loader(data.x_train, data.y_train, batch_size=64, shuffle=True)
    tuned = finetune(student, dense, loader, epochs=2, lr=1e-2, alpha=0.5)
    assert tuned is not student
    assert _state_equal(student, student_before) and _state_equal(dense, dense_before)
    before = distillation_loss(student, dense, (data.x_test, data.y_test))
    after = distillation_loss(tuned, dense, (data.x_test, data.y_test))
    assert after < 0.8 * before
    # labels optional: a loader of inputs only distils alone
    tuned2 = finetune(student, dense, [data.x_train[:256]], epochs=3, lr=1e-2)
    assert distillation_loss(tuned2, dense, (data.x_test, data.y_test)) < before
    with pytest.raises(InvalidInputError, match=r"alpha must be in \[0, 1\]; got 2"):
        finetune(student, dense, loader, alpha=2)
    with pytest.raises(InvalidInputError, match="data must yield at least one batch; got an empty iterable"):
        finetune(student, dense, [])


def test_mipprune_verify_is_the_pipeline_function_after_submodule_import():
    # mipprune/verification/verify.py holds the public function; importing the submodule first
    # must leave mipprune.verify the function (the pipeline entry point), not a module object.
    import importlib

    import mipprune

    module = importlib.import_module("mipprune.verification.verify")
    assert callable(mipprune.verify) and mipprune.verify is module.verify
