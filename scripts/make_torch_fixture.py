"""Write tests/data/torch_reference.npz: PyTorch LSTM/GRU weights, inputs and outputs.

The suite checks ``lstm_lab.interop.from_torch_state`` against this file, so
it needs no torch; when torch is importable it also compares live.

Usage: ``pip install -e '.[bench]' -c benchmarks/constraints.txt && python scripts/make_torch_fixture.py``
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "torch_reference.npz"

# kind, input_size, hidden_size, num_layers, bidirectional, batch_first
MODELS = {
    "lstm": ("LSTM", 3, 5, 2, True, True),
    "gru": ("GRU", 3, 5, 2, True, True),
    "lstm_tm": ("LSTM", 4, 3, 1, False, False),
}


def main():
    torch.manual_seed(2026)
    arrays = {}
    for key, (kind, d_in, H, L, bidir, bf) in MODELS.items():
        module = getattr(torch.nn, kind)(d_in, H, num_layers=L, bidirectional=bidir, batch_first=bf).double()
        with torch.no_grad():  # non-default, non-symmetric values, both biases
            for p in module.parameters():
                p.normal_(0.0, 0.5)
        x = torch.randn((4, 6, d_in) if bf else (6, 4, d_in), dtype=torch.float64)
        y, state = module(x)
        h_n, c_n = state if kind == "LSTM" else (state, None)
        arrays[f"{key}/config"] = np.array([d_in, H, L, int(bidir), int(bf)])
        arrays[f"{key}/x"] = x.numpy()
        arrays[f"{key}/y"] = y.detach().numpy()
        arrays[f"{key}/h_n"] = h_n.detach().numpy()
        if c_n is not None:
            arrays[f"{key}/c_n"] = c_n.detach().numpy()
        for name, value in module.state_dict().items():
            arrays[f"{key}/state/{name}"] = value.numpy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with torch {torch.__version__}")


if __name__ == "__main__":
    main()
