"""How a mask is extracted: one options object, and the one list of method names the API, CLI and config share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .checks import check_sparsity

Method = Literal["wanda", "contrastive", "difference", "obs", "magnitude", "random"]
CALIBRATED_METHODS: tuple[str, ...] = ("wanda", "contrastive", "difference", "obs")
CONTRASTING_METHODS: tuple[str, ...] = ("contrastive", "difference")  # need two or more personas
CONTROL_METHODS: tuple[str, ...] = ("magnitude", "random")
EXTRACTION_METHODS: tuple[str, ...] = CALIBRATED_METHODS + CONTROL_METHODS
# A config's `method` may also say how a mask was made without extraction.
CONFIG_METHODS: tuple[str, ...] = EXTRACTION_METHODS + ("explicit", "combined")
PHI_KINDS: tuple[str, ...] = ("relu", "softplus", "sigmoid")
STRUCTURES: tuple[str, ...] = ("row", "channel")
# The defaults of an extraction, read by the API, the CLI and the docs: what `peft-persona tune` chose for
# extraversion on SmolLM2-135M-Instruct (+0.03 nats/token on neutral text; sparsity 0.5 at strength 1 breaks it).
DEFAULT_SPARSITY = 0.2
DEFAULT_STRENGTH = 0.5
DEFAULT_PHI = "relu"  # the contrastive channel weight: the paper's relu(z)
DEFAULT_TAU = 1.0  # the softplus and sigmoid temperature


@dataclass(frozen=True)
class ExtractionOptions:
    """The recipe of an extraction; validated on construction.

    Args:
        method: ``wanda``, ``contrastive``, ``difference``, ``obs``, or the controls ``magnitude`` and ``random``.
        sparsity: fraction of each output row's weights removed, in [0, 1) (default ``DEFAULT_SPARSITY``, 0.2).
        phi: contrastive channel weight: ``relu(z)``, ``softplus(z / tau)`` or ``sigmoid(z / tau)`` (z-ordered: the
            persona signal ranks every channel, not only those with ``z > 0``).
        tau: softplus and sigmoid temperature, positive.
        structure: ``row`` (each output row keeps its best weights) or ``channel`` (whole input channels are
            removed from every row, the mask analogue of ablating directions).
        reference: reproduce the paper code's statistics and tie handling (comparison only).
        seed: seed of the ``random`` control.
    """

    method: Method = "wanda"
    sparsity: float = DEFAULT_SPARSITY
    phi: Literal["relu", "softplus", "sigmoid"] = DEFAULT_PHI
    tau: float = DEFAULT_TAU
    reference: bool = False
    seed: int = 0
    structure: Literal["row", "channel"] = "row"

    def __post_init__(self) -> None:
        if self.method not in EXTRACTION_METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {EXTRACTION_METHODS}")
        check_sparsity(self.sparsity)
        if self.phi not in PHI_KINDS:
            raise ValueError(f"phi must be one of {PHI_KINDS}, got {self.phi!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        if self.structure == "channel" and (self.method in ("obs", "random") or self.reference):
            raise ValueError(f"structure 'channel' needs a per-channel score; method {self.method!r} has none")

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration texts (the controls do not)."""
        return self.method in CALIBRATED_METHODS

    def record(self) -> dict[str, Any]:
        """The fields that shaped the masks, for an adapter's ``calibration`` record."""
        record: dict[str, Any] = {}
        if self.method == "contrastive":
            record.update(phi=self.phi, tau=self.tau)
        if self.structure != "row":
            record["structure"] = self.structure
        if self.method == "random":
            record["seed"] = self.seed
        if self.reference:
            record["reference_mode"] = True
        return record

    def as_dict(self) -> dict[str, Any]:
        """Every field by name."""
        return asdict(self)


def resolve_options(options: ExtractionOptions | None, **keywords: Any) -> ExtractionOptions:
    """``options``, or one built from the keywords that were given; giving both is a ``TypeError``."""
    given = {k: v for k, v in keywords.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in fields(ExtractionOptions)})
    if unknown:
        raise TypeError(
            f"unknown recipe keyword(s) {unknown}; ExtractionOptions has {[f.name for f in fields(ExtractionOptions)]}"
        )
    if options is not None and given:
        raise TypeError(f"pass either `options` or the keywords {sorted(given)}, not both")
    return options if options is not None else ExtractionOptions(**given)


def check_personas(options: ExtractionOptions, names: Sequence[str]) -> None:
    """Raise a ``ValueError`` if ``names`` do not suit the method: none at all, or fewer than two to contrast."""
    if not names:
        raise ValueError("no personas given")
    if options.method in CONTRASTING_METHODS and len(names) < 2:
        raise ValueError(f"{options.method} extraction needs at least two personas, got {list(names)}")
