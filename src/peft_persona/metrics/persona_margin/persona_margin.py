"""`evaluate` module: mean log-likelihood margin (matching minus non-matching, per token) with a bootstrap CI."""

import datasets
import evaluate

from peft_persona.metrics.functions import persona_margin

_DESCRIPTION = """Mean log-likelihood margin of the persona-matching continuation over the non-matching one. Inputs are
summed log-likelihoods per item; with token counts given the margin is per token."""
_KWARGS_DESCRIPTION = """
Args:
    matching (list of float): summed log-likelihood of the matching continuation per item.
    not_matching (list of float): summed log-likelihood of the non-matching continuation per item.
    matching_lengths, not_matching_lengths (list of int, optional): token counts, to normalise per token.
    n_resamples (int, default 2000), seed (int, default 0): the bootstrap.
Returns:
    margin, ci_low, ci_high (percentile bootstrap 95%), n.
Examples:
    >>> metric = evaluate.load(peft_persona.metrics.path("persona_margin"))
    >>> metric.compute(matching=[-1.0, -2.0], not_matching=[-3.0, -2.0])["margin"]
    1.0
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PersonaMargin(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"matching": datasets.Value("float64"), "not_matching": datasets.Value("float64")}
            ),
        )

    def _compute(
        self, matching, not_matching, matching_lengths=None, not_matching_lengths=None, n_resamples=2000, seed=0
    ):
        return persona_margin(matching, not_matching, matching_lengths, not_matching_lengths, n_resamples, seed)
