"""Reading and writing user models: pickled modules, TorchScript, torch.export, ONNX."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mipprune.model_io import detect_format, export_onnx, load_model, load_tensor, save_model
from solvers.errors import InvalidInputError
from tests.mipprune.pruning.blocks import BLOCKS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fmt", ["pickle", "torchscript", "export"])
def test_formats_are_recognised_pickles_and_exports_load_for_pruning(fmt, tmp_path):
    model = BLOCKS["grouped"]().eval()
    x = torch.randn(2, 3, 8, 8)
    path = save_model(model, tmp_path / f"m.{fmt}", fmt, x)
    assert detect_format(path) == fmt
    # a torch.export archive is lifted back to a prunable module, TorchScript converted on sample inputs first
    loaded, got = load_model(path, example=x)
    assert got == fmt
    torch.testing.assert_close(loaded(x), model(x))
    if fmt == "torchscript":  # which it cannot be without
        with pytest.raises(InvalidInputError, match="--input-shape"):
            load_model(path)


def test_onnx_export_is_one_file_that_reproduces_the_model(tmp_path):
    import onnxruntime as ort

    model = BLOCKS["inverted"]().eval()
    x = torch.randn(3, 3, 8, 8)
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    sess = ort.InferenceSession(str(path))
    y = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="existing file"):
        load_model(tmp_path / "missing.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "sd.pt")
    with pytest.raises(InvalidInputError, match="state_dict"):
        load_model(tmp_path / "sd.pt")
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    assert load_tensor(tmp_path / "x.npy").shape == (2, 3)
    with pytest.raises(InvalidInputError, match="must hold a tensor"):
        load_tensor(tmp_path / "sd.pt")
