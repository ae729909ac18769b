"""The transfer passes recipes can name: ``transfer_fit``, ``distill``, ``transfer_structure``,
``transfer_params``.

    steps:
      - pass: transfer_fit        # data: the labelled training samples
        data: train.npz
        head: mlp
      - pass: distill             # teacher_model: default = the recipe's input model
        data: unlabelled.npz
        temperature: 4
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxcomp import model as model_io
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes import Context, Result, register
from onnxcomp.transfer.api import FitOptions, fit
from onnxcomp.transfer.distill import DistillOptions, distill
from onnxcomp.transfer.params import transfer_params
from onnxcomp.transfer.structure import Reinit, fresh_structure


def _val(path: str | None, model: ir.Model):
    from onnxcomp.data import open_data

    return open_data(path, model_io.input_specs(model)) if path else None


def _data(context: Context, step: str):
    if context.data is None:
        raise OnnxcompError(f"{step}: needs data (a 'data' key on the step or the recipe)")
    return context.data


@dataclasses.dataclass
class FitStepOptions(FitOptions):
    val_data: str | None = None  # validation samples; default: a split held out of the data


class TransferFitPass(ir.passes.InPlacePass):
    """Train a head on the model's features (numpy) and splice it on."""

    def __init__(self, options: FitStepOptions, context: Context):
        super().__init__()
        self.options, self.context = options, context

    def call(self, model: ir.Model) -> Result:
        data = _data(self.context, "transfer_fit")
        options = FitOptions(
            **{f.name: getattr(self.options, f.name) for f in dataclasses.fields(FitOptions)}
        )
        result = fit(
            model,
            data,
            options,
            val_data=_val(self.options.val_data, model),
            threads=self.context.threads,
        )
        report = {k: v for k, v in result.report.items() if k != "history"}
        return Result(result.model, modified=True, report=report)


@dataclasses.dataclass
class DistillStepOptions(DistillOptions):
    teacher_model: str | None = None  # default: the recipe's input model
    val_data: str | None = None


class DistillPass(ir.passes.InPlacePass):
    """Train the model's head on a teacher's soft outputs and splice it on."""

    def __init__(self, options: DistillStepOptions, context: Context):
        super().__init__()
        self.options, self.context = options, context

    def call(self, model: ir.Model) -> Result:
        data = _data(self.context, "distill")
        path = self.options.teacher_model or self.context.model_path
        if path is None:
            raise OnnxcompError("distill: no teacher (set teacher_model)")
        teacher = model_io.load(path)
        options = DistillOptions(
            **{f.name: getattr(self.options, f.name) for f in dataclasses.fields(DistillOptions)}
        )
        result = distill(
            teacher,
            model,
            [data],
            options,
            val_data=_val(self.options.val_data, teacher),
            threads=self.context.threads,
        )
        report = {k: v for k, v in result.report.items() if k != "history"}
        report["teacher"] = str(path)
        return Result(result.model, modified=True, report=report)


@dataclasses.dataclass
class StructureOptions:
    classes: int | None = None
    reinit: Reinit = "all"
    seed: int = 0


class StructurePass(ir.passes.InPlacePass):
    """Fresh weights, last layer resized."""

    def __init__(self, options: StructureOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> Result:
        model, report = fresh_structure(
            model, self.options.classes, self.options.reinit, self.options.seed
        )
        return Result(model, modified=True, report=report)


@dataclasses.dataclass
class ParamsOptions:
    source_model: str | None = None  # copy weights from here


class ParamsPass(ir.passes.InPlacePass):
    """Copy weights from another model where they correspond."""

    def __init__(self, options: ParamsOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> Result:
        if not self.options.source_model:
            raise OnnxcompError("transfer_params: set source_model")
        model, report = transfer_params(model_io.load(self.options.source_model), model)
        return Result(model, modified=report["copied_tensors"] > 0, report=report)


register(
    "transfer_fit", FitStepOptions, help="train a new head on the model's features and splice it on"
)(lambda options, context: TransferFitPass(options, context))
register("distill", DistillStepOptions, help="train the head on a teacher's soft outputs")(
    lambda options, context: DistillPass(options, context)
)
register(
    "transfer_structure", StructureOptions, help="fresh weights, last layer resized to `classes`"
)(lambda options, context: StructurePass(options))
register(
    "transfer_params", ParamsOptions, help="copy weights from source_model where they correspond"
)(lambda options, context: ParamsPass(options))
