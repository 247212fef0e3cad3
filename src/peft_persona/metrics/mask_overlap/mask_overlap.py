"""`evaluate` module: Jaccard similarity and difference rate between two binary masks, overall and per layer."""

import datasets
import evaluate

from peft_persona.metrics.functions import mask_overlap

_DESCRIPTION = """Overlap of two persona mask adapters. Each example is one layer: `predictions` is the first adapter's
flattened mask, `references` the second's (True = weight kept)."""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of bool): the first adapter's flattened mask, one list per layer.
    references (list of list of bool): the second adapter's, same layers in the same order.
    layer_names (list of str, optional): names for the per-layer breakdown (default "0", "1", ...).
Returns:
    jaccard, difference_rate, density_a, density_b, size, and per_layer (the same per layer).
    For whole models prefer peft_persona.metrics.mask_overlap(get_masks(m, a), get_masks(m, b)).
Examples:
    >>> metric = evaluate.load(peft_persona.metrics.path("mask_overlap"))
    >>> metric.compute(predictions=[[True, True, False, False]], references=[[True, False, True, False]])["jaccard"]
    0.3333333333333333
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskOverlap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("bool")),
                    "references": datasets.Sequence(datasets.Value("bool")),
                }
            ),
        )

    def _compute(self, predictions, references, layer_names=None):
        names = [str(i) for i in range(len(predictions))] if layer_names is None else list(layer_names)
        if len(names) != len(predictions):
            raise ValueError(f"layer_names and predictions differ in length: {len(names)} vs {len(predictions)}")
        # references of another length leave layers unmatched, which mask_overlap reports by name
        return mask_overlap(dict(zip(names, predictions, strict=True)), dict(zip(names, references, strict=False)))
