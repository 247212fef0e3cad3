"""`evaluate` module: persona alignment accuracy with a Wilson 95% CI and a per-persona breakdown."""

import datasets
import evaluate

from peft_persona.metrics.functions import persona_alignment

_DESCRIPTION = """Share of items where the model chose the persona-matching option. `predictions` are chosen option ids,
`references` the matching option ids; a prediction of -1 marks a tie and earns half credit."""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): chosen option per item (-1 for a tie).
    references (list of int): persona-matching option per item.
    personas (list of str, optional): persona label per item, for a per-persona breakdown.
Returns:
    accuracy, ci_low, ci_high (Wilson 95%), n, and per_persona when personas are given.
Examples:
    >>> metric = evaluate.load(peft_persona.metrics.path("persona_alignment"))
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
    0.6666666666666666
"""
_CITATION = """@inproceedings{ye2026persona, title={Your Language Model Secretly Contains Personality Subnetworks},
author={Ye, Ruimeng and others}, booktitle={ICLR}, year={2026}, note={arXiv:2602.07164}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PersonaAlignment(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, personas=None):
        return persona_alignment(predictions, references, personas)
