"""A model-based test of the weight engine: any sequence of the PEFT operations users combine keeps the model equal,
bit for bit, to a functional reference.

The reference is a plain model whose weights are ``W * F_1 * F_2 ...`` computed from the original weights, with
``F = M + (1 - s) (1 - M)`` for each adapter that acts: the merged adapters if any are merged (as with PEFT's LoRA,
active adapters that are not merged do not act then), else the active ones while adapters are enabled. After every
step the logits (under ``no_grad``, ``inference_mode`` or grad), the merged or unloaded models, and every base weight
in ``get_base_model().state_dict()`` (the original whenever nothing is merged) are compared with it exactly.

``ENGINE_EXAMPLES`` and ``ENGINE_STEPS`` scale the run (CI uses the small defaults); the number of steps tried is
printed at the end (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from peft import PeftModel

import peft_persona as pp
from conftest import VOCAB, logits, masked_reference, random_masks, tiny_llama
from peft_persona.adapter_files import BASE_ADAPTER
from peft_persona.tuner import set_weight_mode

EXAMPLES = int(os.environ.get("ENGINE_EXAMPLES", "12"))
STEPS = int(os.environ.get("ENGINE_STEPS", "25"))
NAMES = ("a", "b", "c")
TOKENS = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(5))
GRAD_MODES = ("no_grad", "inference_mode", "grad")
STRENGTHS = st.sampled_from([1.0, 1.0, 0.5, 0.25, 0.0])
STEPS_TRIED = {"steps": 0, "examples": 0}


def grad_mode(name: str) -> contextlib.AbstractContextManager:
    return {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[name]()


def plain_key(key: str) -> str:
    return key.replace(".base_layer.", ".")


class EngineMachine(RuleBasedStateMachine):
    """Operations on a ``PeftModel`` of persona masks on a tiny Llama, against a functional reference."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        STEPS_TRIED["examples"] += 1
        self.original = {k: v.clone() for k, v in tiny_llama(0, self.dtype).state_dict().items()}
        self.reference = tiny_llama(0, self.dtype)
        self.model: PeftModel | None = None
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        self.strength: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.seed = 10
        self.trainable = False  # the base weights require grad
        self.inference_copy = False  # the model is a deepcopy made inside inference_mode: its tensors are inference
        self.folder = tempfile.mkdtemp(prefix="engine-")

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ the reference
    def acting(self, disabled: bool = False) -> list[str]:
        if self.merged:
            return list(self.merged)
        return [] if disabled else list(self.active)

    def expected_weights(self, adapters: list[str]) -> dict[str, torch.Tensor]:
        weights = {k: v.clone() for k, v in self.original.items()}
        for name in adapters:
            off = torch.tensor(1.0 - self.strength[name], dtype=self.dtype)
            if self.strength[name] == 0:
                continue
            for module, mask in self.masks[name].items():
                key = f"{module}.weight"
                weights[key] = weights[key] * torch.where(mask, torch.tensor(1, dtype=self.dtype), off)
        return weights

    def reference_logits(self, adapters: list[str], tokens: torch.Tensor = TOKENS) -> torch.Tensor:
        self.reference.load_state_dict(self.expected_weights(adapters))
        with torch.no_grad():
            return self.reference(tokens).logits

    def check_logits(self, got: torch.Tensor, adapters: list[str], what: str) -> None:
        want = self.reference_logits(adapters)
        assert torch.equal(got.detach(), want), f"{what}: logits differ from {adapters} by {(got - want).abs().max()}"

    def fresh_model(self) -> None:
        """After ``merge_and_unload`` / ``unload``: the same adapters on a new base model."""
        self.model, self.merged, self.trainable, self.inference_copy = None, [], False, False
        names, active = list(self.masks), self.active
        for name in names:
            self._inject(name)
        if self.model is not None and active:
            self.model.base_model.set_adapter(active)
        self.active = active if self.model is not None else []

    def base(self) -> torch.nn.Module:
        """A fresh base model holding the current original weights."""
        model = tiny_llama(0, self.dtype)
        model.load_state_dict(self.original)
        return model

    def _inject(self, name: str) -> None:
        config = pp.PersonaMaskConfig(strength=self.strength[name])
        base = self.model if self.model is not None else self.base()
        self.model = pp.add_mask_adapter(base, self.masks[name], name, config=config)

    # ------------------------------------------------------------------------------------------ rules
    # torch refuses ``requires_grad=True`` on inference tensors, which PEFT's injection sets again: a model copied
    # inside inference_mode whose weights require grad cannot take a new adapter (LoRA alike), nor be made trainable.
    @precondition(lambda self: len(self.masks) < len(NAMES) and not (self.inference_copy and self.trainable))
    @rule(strength=STRENGTHS, load=st.booleans())
    def add_adapter(self, strength: float, load: bool) -> None:
        name = next(n for n in NAMES if n not in self.masks)
        self.seed += 1
        self.masks[name] = random_masks(tiny_llama(0, self.dtype), self.seed, keep=0.7)
        self.strength[name] = strength
        if load and self.model is not None:
            saved = pp.add_mask_adapter(self.base(), self.masks[name], name, pp.PersonaMaskConfig(strength=strength))
            saved.save_pretrained(os.path.join(self.folder, "single"))
            self.model.load_adapter(os.path.join(self.folder, "single", name), adapter_name=name)
        else:
            self._inject(name)
        if not self.active:
            self.active = [name]
        self.merged = []  # PEFT's injection sets the active adapters again, which unmerges (LoRA alike)

    @precondition(lambda self: self.model is not None)
    @rule(data=st.data())
    def set_adapter(self, data: st.DataObject) -> None:
        names = data.draw(st.lists(st.sampled_from(sorted(self.masks)), min_size=1, max_size=3, unique=True))
        if len(names) == 1 and data.draw(st.booleans()):
            self.model.set_adapter(names[0])
        else:
            self.model.base_model.set_adapter(names)
        self.active, self.merged = names, []  # PEFT unmerges before it switches

    @precondition(lambda self: self.model is not None)
    @rule(data=st.data(), mode=st.sampled_from(GRAD_MODES))
    def forward(self, data: st.DataObject, mode: str) -> None:
        if mode == "grad" and self.inference_copy and self.trainable:
            mode = "no_grad"  # torch: inference tensors that require grad cannot enter autograd (any model)
        with grad_mode(mode):
            got = self.model(TOKENS).logits
        if mode == "grad" and got.requires_grad:
            got.sum().backward()
        self.check_logits(got, self.acting(), f"forward under {mode}")

    @precondition(lambda self: self.model is not None)
    @rule()
    def forward_disabled(self) -> None:
        with self.model.disable_adapter(), torch.no_grad():
            got = self.model(TOKENS).logits
        self.merged = []  # a forward with adapters disabled unmerges, as LoRA's does
        self.check_logits(got, [], "forward inside disable_adapter()")

    @precondition(lambda self: self.model is not None and not self.merged)
    @rule(data=st.data())
    def mixed_batch(self, data: st.DataObject) -> None:
        choices = sorted(self.masks) + [BASE_ADAPTER]
        names = data.draw(st.lists(st.sampled_from(choices), min_size=len(TOKENS), max_size=len(TOKENS)))
        tokens = TOKENS[:, : data.draw(st.sampled_from([1, TOKENS.shape[1]]))]  # 1: a decoding step's shape
        with torch.no_grad():
            got = self.model(tokens, adapter_names=names).logits
        for row, name in enumerate(names):
            want = self.reference_logits([] if name == BASE_ADAPTER else [name], tokens[row : row + 1])
            assert torch.allclose(got[row : row + 1], want, rtol=0, atol=1e-5), f"mixed batch row {row} ({name})"

    @precondition(lambda self: self.model is not None)
    @rule(data=st.data())
    def merge_adapter(self, data: st.DataObject) -> None:
        names = data.draw(st.none() | st.lists(st.sampled_from(sorted(self.masks)), min_size=1, unique=True))
        with pytest.warns(UserWarning) if self._merges_nothing(names) else contextlib.nullcontext():
            self.model.merge_adapter(adapter_names=names)
        wanted = self.active if names is None else names
        self.merged += [n for n in wanted if n not in self.merged]

    def _merges_nothing(self, names: list[str] | None) -> bool:
        return all(n in self.merged for n in (self.active if names is None else names))

    @precondition(lambda self: self.model is not None and self.merged)
    @rule()
    def unmerge_adapter(self) -> None:
        self.model.unmerge_adapter()
        self.merged = []

    @precondition(lambda self: self.model is not None)
    @rule(data=st.data())
    def merge_and_unload(self, data: st.DataObject) -> None:
        names = data.draw(st.none() | st.lists(st.sampled_from(sorted(self.masks)), min_size=1, unique=True))
        wanted = self.active if names is None else names
        expected = self.merged + [n for n in wanted if n not in self.merged]
        merged = self.model.merge_and_unload(adapter_names=names)
        assert not any("persona" in k for k in merged.state_dict()), "merge_and_unload left persona layers"
        with torch.no_grad():
            self.check_logits(merged(TOKENS).logits, expected, f"merge_and_unload({names})")
        self.fresh_model()

    @precondition(lambda self: self.model is not None)
    @rule()
    def unload(self) -> None:
        base = self.model.unload()
        with torch.no_grad():
            self.check_logits(base(TOKENS).logits, [], "unload()")
        self.fresh_model()

    @precondition(lambda self: self.model is not None and len(self.masks) > 1)
    @rule(data=st.data())
    def delete_adapter(self, data: st.DataObject) -> None:
        # PeftModel keeps one active adapter name of its own, which a multi-adapter set_adapter does not update:
        # deleting that one while several are active leaves the PeftModel pointing at it (PEFT's limit, any method)
        recorded = self.model.active_adapter if len(self.active) > 1 else None
        name = data.draw(st.sampled_from(sorted(n for n in self.masks if n != recorded)))
        if self.merged:
            self.model.unmerge_adapter()
            self.merged = []
        self.model.delete_adapter(name)
        del self.masks[name], self.strength[name]
        self.active = list(self.model.active_adapters)
        assert name not in self.active and set(self.active) <= set(self.masks)

    @precondition(lambda self: self.model is not None)
    @rule(data=st.data(), strength=STRENGTHS)
    def set_strength(self, data: st.DataObject, strength: float) -> None:
        name = data.draw(st.sampled_from(sorted(self.masks)))
        if name in self.merged:
            with pytest.raises(RuntimeError, match="merged"):
                pp.set_strength(self.model, name, strength)
            return
        pp.set_strength(self.model, name, strength)
        self.strength[name] = strength

    @precondition(lambda self: self.model is not None)
    @rule(mode=st.sampled_from(GRAD_MODES))
    def deepcopy(self, mode: str) -> None:
        with grad_mode(mode):
            self.model = copy.deepcopy(self.model)
        self.inference_copy |= mode == "inference_mode"

    @precondition(lambda self: self.model is not None and not self.inference_copy)
    @rule(trainable=st.booleans())
    def base_requires_grad(self, trainable: bool) -> None:
        """Fine-tuning the base model: the engine must then compute ``W_eff`` apart and keep gradients right."""
        for parameter in self.model.get_base_model().parameters():
            parameter.requires_grad_(trainable)
        self.trainable = trainable

    @precondition(lambda self: self.model is not None)
    @rule(data=st.data())
    def set_masks(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n in self.masks if n not in self.merged) or ["-"]))
        if name == "-":
            return
        self.seed += 1
        masks = random_masks(tiny_llama(0, self.dtype), self.seed, keep=0.7)
        pp.set_masks(self.model, name, masks)
        self.masks[name] = masks

    @precondition(lambda self: self.model is not None)
    @rule(in_place=st.booleans(), keep_original=st.booleans(), cache_mixed=st.booleans())
    def set_weight_mode(self, in_place: bool, keep_original: bool, cache_mixed: bool) -> None:
        set_weight_mode(self.model, in_place=in_place, keep_original=keep_original, cache_mixed=cache_mixed)

    @precondition(lambda self: self.model is not None and not self.merged)
    @rule()
    def save_and_reload(self) -> None:
        folder = os.path.join(self.folder, "all")
        shutil.rmtree(folder, ignore_errors=True)
        self.model.save_pretrained(folder)
        names = list(self.masks)
        model = PeftModel.from_pretrained(self.base(), os.path.join(folder, names[0]), names[0])
        for name in names[1:]:
            model.load_adapter(os.path.join(folder, name), adapter_name=name)
        model.base_model.set_adapter(self.active)
        self.model, self.trainable, self.inference_copy = model, False, False

    @precondition(lambda self: self.model is not None and not self.merged and not self.inference_copy)
    @rule(data=st.data(), by_hand=st.booleans())
    def write_base_weights(self, data: st.DataObject, by_hand: bool) -> None:
        """New original weights for some targeted layers, loaded with ``load_state_dict`` or written by hand through
        the parameter (under ``no_grad``, while adapters are disabled and the weight holds the original): whatever
        the engine recorded of the old weights (switching records, mixed caches) must not survive."""
        keys = sorted(k for k in self.original if k.endswith("proj.weight"))
        chosen = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
        self.seed += 1
        generator = torch.Generator().manual_seed(self.seed)
        new = {
            k: (self.original[k].float() + 1e-3 * torch.randn(self.original[k].shape, generator=generator)).to(
                self.dtype
            )
            for k in chosen
        }
        base = self.model.get_base_model()
        if by_hand:
            with self.model.disable_adapter(), torch.no_grad():
                base(TOKENS[:1, :2])  # the weight now holds the original
                for key, value in new.items():
                    base.get_parameter(key.replace(".weight", ".base_layer.weight")).copy_(value)
        else:
            base.load_state_dict({k.replace(".weight", ".base_layer.weight"): v for k, v in new.items()}, strict=False)
        self.original.update(new)

    # ------------------------------------------------------------------------------------------ invariants
    @invariant()
    def base_state_holds_originals_unless_merged(self) -> None:
        STEPS_TRIED["steps"] += 1
        if self.model is None:
            return
        want = self.expected_weights(self.merged)
        state = {plain_key(k): v for k, v in self.model.get_base_model().state_dict().items() if "persona_" not in k}
        assert set(state) == set(want)
        different = [k for k in want if not torch.equal(state[k], want[k])]
        assert not different, f"base state_dict differs from the weights of {self.merged} at {different[:3]}"

    @invariant()
    def merged_adapters_as_expected(self) -> None:
        if self.model is not None:
            layer = next(m for m in self.model.modules() if hasattr(m, "merged_adapters"))
            assert sorted(layer.merged_adapters) == sorted(self.merged)


class Bfloat16EngineMachine(EngineMachine):
    dtype = torch.bfloat16


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEngineFloat32 = EngineMachine.TestCase
TestEngineFloat32.settings = SETTINGS
TestEngineBfloat16 = Bfloat16EngineMachine.TestCase
TestEngineBfloat16.settings = settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))


def teardown_module() -> None:
    print(f"\nengine state machine: {STEPS_TRIED['steps']} steps over {STEPS_TRIED['examples']} runs")


# ---------------------------------------------------------------------------------------------- found, and fixed
def two_adapters() -> PeftModel:
    model = pp.add_mask_adapter(tiny_llama(), random_masks(tiny_llama(), 1), "a")
    return pp.add_mask_adapter(model, random_masks(tiny_llama(), 2), "b")


def masked_logits(seed: int) -> torch.Tensor:
    return logits(masked_reference(tiny_llama, 0, [random_masks(tiny_llama(), seed)]), TOKENS)


def test_merge_and_unload_of_an_inactive_adapter_holds_that_adapter_alone():
    model = two_adapters()
    model.set_adapter("a")
    with torch.no_grad():
        model(TOKENS)
    merged = model.merge_and_unload(adapter_names=["b"])  # was: a and b both in the weights (max diff 0.09)
    with torch.no_grad():
        assert torch.equal(merged(TOKENS).logits, masked_logits(2))


def test_deepcopy_inside_inference_mode_runs_outside_it():
    model = two_adapters()
    model.set_adapter("a")
    with torch.inference_mode():
        copied = copy.deepcopy(model)
    with torch.no_grad():  # was: "Inference tensors do not track version counter"
        assert torch.equal(copied(TOKENS).logits, masked_logits(1))
    copied.set_adapter("b")  # and it can switch: its weights became normal tensors, in place
    with torch.no_grad():
        assert torch.equal(copied(TOKENS).logits, masked_logits(2))


def test_base_state_dict_holds_the_original_weights_while_nothing_is_merged():
    model = two_adapters()
    model.set_adapter("a")
    with torch.no_grad():
        before = model(TOKENS).logits
    state = {plain_key(k): v for k, v in model.get_base_model().state_dict().items() if "persona_" not in k}
    original = tiny_llama().state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original)  # was: 14 of 21 held W * M
    with torch.no_grad():  # and the next forward writes the active adapter back
        assert torch.equal(model(TOKENS).logits, before)


def new_base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's targeted weights plus 1e-3, as a ``load_state_dict`` for ``model``'s base."""
    state = model.get_base_model().state_dict()
    return {k: v + 1e-3 for k, v in state.items() if k.endswith("base_layer.weight")}


def base_weights_masked(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    masks = random_masks(tiny_llama(), seed)
    return {k: v * masks[k.removesuffix(".base_layer.weight")] for k, v in state.items()}


@pytest.mark.parametrize("how", ["load_state_dict", "by hand"])
@pytest.mark.parametrize("keep_original", [False, True])
def test_a_switch_after_new_base_weights_uses_the_new_weights(how, keep_original):
    """Found by the state machine's write_base_weights rule: with ``keep_original`` the dense copy of the old
    weights came back on the next switch. The default's recorded original values must not either."""
    model = two_adapters()
    set_weight_mode(model, keep_original=keep_original)
    with torch.no_grad():
        for name in ("a", "b", "a", "b"):  # both adapters recorded
            model.set_adapter(name)
            model(TOKENS)
    new = new_base_weights(model)
    base = model.get_base_model()
    if how == "load_state_dict":
        base.load_state_dict(new, strict=False)
    else:
        with model.disable_adapter(), torch.no_grad():
            model(TOKENS)  # the weight holds the original
            for key, value in new.items():
                base.get_parameter(key).copy_(value)
    model.set_adapter("a")
    with torch.no_grad():
        model(TOKENS)
    weights = {k: base.get_parameter(k).detach().clone() for k in new}  # before state_dict() disarms the layers
    held = {k: v for k, v in base.state_dict().items() if k in new}
    assert all(torch.equal(weights[k], base_weights_masked(new, 1)[k]) for k in new)  # a's W * M of the new W
    assert all(torch.equal(held[k], new[k]) for k in new)  # and its state the new original


@pytest.mark.parametrize("offloaded", [False, True])
def test_merge_and_unmerge_are_exact_with_and_without_accelerate_hooks(offloaded):
    """``merge_adapter``/``unmerge_adapter`` skip PEFT's per-layer onload context unless accelerate hooks are on the
    model (``cpu_offload``), where PEFT's own path runs; both leave exactly the merged and the original weights."""
    from accelerate import cpu_offload

    model = two_adapters()
    if offloaded:
        cpu_offload(model.get_base_model(), execution_device="cpu")
    assert model.base_model._has_accelerate_hooks() is offloaded
    model.set_adapter("b")
    model.merge_adapter()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, masked_logits(2))
    model.unmerge_adapter()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(TOKENS).logits, logits(tiny_llama(), TOKENS))
