"""Quickstart: train the digits CNN, select channels with LASSO, prune, compare accuracies.

Run: ``python examples/quickstart.py`` (about ten seconds on a laptop CPU, no download).
"""
from __future__ import annotations

from rich import print as rprint

from mipprune import ChannelSelector
from mipprune.data import make_loader
from mipprune.train import count_flops, count_params, evaluate, train_digits_cnn


def main() -> None:
    # 1. A small trained model and the embedded digits data (sklearn's 8×8 digits).
    model, data = train_digits_cnn(seed=0, epochs=5)
    test = (data.x_test, data.y_test)
    calibration = make_loader(data.x_train, batch_size=256)  # inputs only are used; labels ignored

    # 2. Keep half of the channels of every prunable layer, chosen by LASSO and refitted by least
    #    squares, layer after layer (He et al. 2017).
    selector = ChannelSelector(method="lasso", sparsity=0.5).fit(model, calibration)
    rprint(selector.report())
    print("kept input channels of layer '3':", selector.get_support("3").nonzero()[0].tolist())

    # 3. Physically smaller copies: with reconstructed weights, and with the old weights sliced.
    pruned = selector.prune(model)
    mask_only = selector.prune(model, reconstruct=False)

    print(f"dense accuracy: {evaluate(model, test):.4f}")
    print(f"pruned accuracy without reconstruction: {evaluate(mask_only, test):.4f}")
    print(f"pruned accuracy with reconstruction: {evaluate(pruned, test):.4f}")
    print(f"parameters: {count_params(model)} -> {count_params(pruned)}")
    print(f"FLOPs (MACs per image): {count_flops(model, (1, 8, 8))} -> {count_flops(pruned, (1, 8, 8))}")


if __name__ == "__main__":
    main()
