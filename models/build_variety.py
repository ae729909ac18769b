"""Small models with features users' models have: LSTM, If, Loop, ai.onnx.ml, Constant weights.

All are trained on the digits split of build_digits.py (so each has a measurable accuracy) and
written to models/variety/ (each well under 200 KB):

    python models/build_variety.py [--out-dir models/variety]

- lstm_digits.onnx        torch nn.LSTM over the 8 image rows, opset 14, input [N, 8, 8]
- if_digits.onnx          torch.jit.script with a data-dependent branch -> If, opset 17, [N, 64]
- loop_digits.onnx        torch.jit.script RNN written as a loop over rows -> Loop, opset 17
- logreg_digits.onnx      scikit-learn LogisticRegression via skl2onnx (LinearClassifier, no ZipMap)
- const_cnn_digits.onnx   slim digits CNN at opset 12 with every weight a Constant node

Needs the `build` extra (torch, scikit-learn) and skl2onnx.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import warnings

import numpy as np
import onnx

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from models import build_digits  # noqa: E402

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
warnings.filterwarnings("ignore", message=".*constant folding.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
warnings.filterwarnings("ignore", message=".*LSTM.*batch_size.*")


def _export(model, example, path: pathlib.Path, opset: int, input_shape_names: dict) -> None:
    import torch

    torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": input_shape_names, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )


def _modules():
    import torch
    from torch import nn

    class LstmClassifier(nn.Module):
        """Rows of the image as a sequence: LSTM(8 -> 32), last hidden state, Linear head."""

        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, rows, 8)
            _, (h, _) = self.lstm(x)
            return self.head(h[-1])

    class BranchyMlp(nn.Module):
        """A shared trunk, then one of two heads chosen by the batch's mean ink (an If node)."""

        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(64, 64)
            self.dark = nn.Linear(64, 10)
            self.light = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 64)
            h = torch.relu(self.trunk(x))
            if bool(x.mean() > 0.3):
                return self.dark(h)
            return self.light(torch.tanh(h))

    class LoopRnn(nn.Module):
        """An Elman RNN written as a Python loop over the rows, so the export holds a Loop."""

        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 48)
            self.rec = nn.Linear(48, 48, bias=False)
            self.head = nn.Linear(48, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, rows, 8)
            h = torch.zeros(x.shape[0], 48, dtype=x.dtype)
            for t in range(x.shape[1]):
                h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            return self.head(h)

    return LstmClassifier, BranchyMlp, LoopRnn


def rows(x: np.ndarray) -> np.ndarray:
    """(samples, 1, 8, 8) images -> (samples, 8, 8) sequences of rows."""
    return x.reshape(len(x), 8, 8)


def flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 64)


def lift_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a Constant node at the top of the graph (Paddle2ONNX style)."""
    graph = model.graph
    consts = [
        onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
        for t in graph.initializer
    ]
    names = {t.name for t in graph.initializer}
    kept_inputs = [i for i in graph.input if i.name not in names]
    del graph.initializer[:]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    nodes = consts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def build_all(out: pathlib.Path) -> dict[str, float]:
    """Train and export every variety model into `out`; returns test accuracy by file name."""
    import torch
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(1)
    split = build_digits.load_split()
    lstm_cls, branchy_cls, loop_cls = _modules()
    acc: dict[str, float] = {}
    seq_axes = {0: "batch", 1: "rows"}

    torch.manual_seed(build_digits.SEED)
    lstm = build_digits.train(lstm_cls(), rows(split.x_train), split.y_train, epochs=80, lr=1e-2)
    acc["lstm_digits.onnx"] = build_digits.accuracy(lstm, rows(split.x_test), split.y_test)
    _export(lstm, rows(split.x_test[:2]), out / "lstm_digits.onnx", 14, seq_axes)

    torch.manual_seed(build_digits.SEED)
    branchy = build_digits.train(branchy_cls(), flat(split.x_train), split.y_train, epochs=60)
    acc["if_digits.onnx"] = build_digits.accuracy(branchy, flat(split.x_test), split.y_test)
    _export(
        torch.jit.script(branchy), flat(split.x_test[:2]), out / "if_digits.onnx", 17, {0: "batch"}
    )

    torch.manual_seed(build_digits.SEED)
    loop = build_digits.train(loop_cls(), rows(split.x_train), split.y_train, epochs=80, lr=5e-3)
    acc["loop_digits.onnx"] = build_digits.accuracy(loop, rows(split.x_test), split.y_test)
    _export(torch.jit.script(loop), rows(split.x_test[:2]), out / "loop_digits.onnx", 17, seq_axes)

    logreg = LogisticRegression(max_iter=2000, random_state=build_digits.SEED)
    logreg.fit(flat(split.x_train), split.y_train)
    acc["logreg_digits.onnx"] = float(logreg.score(flat(split.x_test), split.y_test))
    proto = convert_sklearn(
        logreg,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(logreg): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    proto.graph.name = "logreg_digits"  # skl2onnx names the graph with a random uuid
    # skl2onnx can list the default domain twice; keep one entry per domain.
    opsets = {o.domain: o.version for o in proto.opset_import}
    del proto.opset_import[:]
    proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, out / "logreg_digits.onnx")

    cnn, acc["const_cnn_digits.onnx"] = build_digits.build_cnn(
        split, widths=(16, 32, 32), hidden=64
    )
    build_digits.export(cnn, split.x_test[:1], out / "const_cnn_digits.onnx", opset=12)
    const = lift_to_constants(onnx.load(out / "const_cnn_digits.onnx"))
    onnx.checker.check_model(const, full_check=True)
    onnx.save(const, out / "const_cnn_digits.onnx")
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE / "variety")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, value in build_all(args.out_dir).items():
        size = (args.out_dir / name).stat().st_size
        log.info("%-24s %7d bytes  test accuracy %.4f", name, size, value)


if __name__ == "__main__":
    main()
