"""The one configuration object of every adaptation method, shared by the Python API, Hydra and saved adapters."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from kasa.adapters.methods import METHOD_TABLE, Method, methods_where

METHODS: dict[str, str] = {name: method.description for name, method in METHOD_TABLE.items()}  # name -> what it is
PEFT_METHODS = methods_where(peft=True)
KASA_INITS = ("normal", "principal", "minor", "u_normal")
ORTH_FORMS = ("paper", "authors")
SVD_METHODS = ("gram", "svd")  # how the truncated components are computed (kasa.adapters.truncation)
# The loss weights each method has: beta scales L2 = sum(dSigma^2), gamma scales L3 (orthogonality). No other
# method has either term, so their beta and gamma settings mean nothing (tables leave them out).
LOSS_WEIGHTS: dict[str, tuple[str, ...]] = {m.name: m.loss_weights for m in METHOD_TABLE.values() if m.loss_weights}
TRUNCATING_METHODS = methods_where(truncates=True)  # remove minor components that no adapter holds
CONFIG_ATTRIBUTE = "kasa_adapter_config"  # where an adapted model keeps its AdapterConfig
TRUNCATION_BASES = ("weight", "activation")


# Settings of the trained model that only some methods use: setting -> whether a method uses it. Setting one that
# the run's method does not use changes nothing, which kasa-train says (a sweep over beta with method=lora repeats
# one run). Where and how the work runs (svd_device, svd_cache_dir, svd_method, calibration_memory_gib) is not here.
METHOD_SETTINGS: dict[str, Callable[[Method], bool]] = {
    "beta": lambda m: "beta" in m.loss_weights,
    "gamma": lambda m: "gamma" in m.loss_weights,
    "orth_form": lambda m: "gamma" in m.loss_weights,
    "init": lambda m: m.block == "kasa",
    **dict.fromkeys(("truncation_rank", "truncation_basis"), lambda m: m.truncates),
    "peft_options": lambda m: m.peft,
    **dict.fromkeys(("rank", "alpha", "dropout", "target_modules", "fused_modules"), lambda m: m.ranked),
}
CALIBRATION_SETTINGS = ("calibration_samples", "calibration_damping")  # used by truncation_basis=activation


def _names(value: Any) -> list[str]:
    """Module names as a list: one name given as a string is that name (list() would split it into letters)."""
    return [value] if isinstance(value, str) else list(value)


def has_loss_weight(method: str, weight: str) -> bool:
    """Whether `method`'s loss has the term that `weight` ("beta" or "gamma") scales."""
    return weight in LOSS_WEIGHTS.get(method, ())


def method_uses(method: str, setting: str) -> bool:
    """Whether `method` reads `setting` of the method group (full fine-tuning has no rank, LoRA no beta); True for
    a setting every method reads, and for a method kasa does not know (a summary written by another version)."""
    uses = METHOD_SETTINGS.get(setting)
    return uses is None or method not in METHOD_TABLE or uses(METHOD_TABLE[method])


# The numeric settings: name -> whether it is a whole number (a count) rather than any real number
NUMBER_SETTINGS = {"rank": True, "truncation_rank": True, "calibration_samples": True, "alpha": False, "beta": False,
                   "gamma": False, "dropout": False, "calibration_damping": False, "calibration_memory_gib": False}


@dataclass
class AdapterConfig:
    """How to adapt a model.

    method: one of METHODS. rank/alpha: r and alpha (update scaled by alpha / r). truncation_rank: how many minor
    singular components KaSA's truncation removes (default r; the paper's F.4 varies it). dropout: on the adapter input.
    target_modules: module names (or dotted suffixes) to adapt; `name.part` adapts one part of a fused projection
    listed in `fused_modules` (e.g. `c_attn.q` with fused_modules {c_attn: [q, k, v]}: GPT-2's q, k, v split in 3).
    trainable_modules: modules trained fully besides the adapters (task heads, e.g. `classifier`).
    beta, gamma: weights of L2 = sum(dSigma^2) and L3 (orthogonality); orth_form: `paper` (r x r Grams, eq. 11)
    or `authors` (the released code's n x n / m x m Grams, computed exactly at r x r cost; the paper's beta/gamma
    tables were tuned with this form). init: KaSA's initialisation (paper F.6): `normal` (dU = 0; dV, dSigma
    normal), `principal`, `minor`, `u_normal` (dU, dSigma normal; dV = 0).
    svd_method: `gram` (fast, exact) or `svd` (torch.linalg.svd); svd_device: where decompositions run (null:
    a GPU if present); svd_cache_dir: on-disk cache of decompositions (null: off).
    truncation_basis: `weight` (the paper: W's r smallest singular triplets) or `activation` (the rank-r part whose
    removal changes the outputs least on calibration inputs; truncating methods only, see kasa.adapters.truncation);
    calibration_samples: training examples whose inputs give C = E[x x^T]; calibration_damping: C + damping *
    mean(diag C) I before its Cholesky factor; calibration_memory_gib: bound on the calibration matrices held at once.
    peft_options: extra keyword arguments of the PEFT config of the PEFT-backed methods (dora: LoraConfig, adalora:
    AdaLoraConfig, vera: VeraConfig), e.g. {init_r: 12, tinit: 0.15, tfinal: 0.5} for AdaLoRA; ignored by the others.
    """

    method: str = "kasa"
    rank: int = 8
    truncation_rank: int | None = None  # singular components removed from W0 (paper F.4's k); null: the rank r
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    fused_modules: dict[str, list[str]] = field(default_factory=dict)
    trainable_modules: list[str] = field(default_factory=list)
    beta: float = 1e-4
    gamma: float = 1e-3
    orth_form: str = "paper"
    init: str = "normal"
    svd_method: str = "gram"
    svd_device: str | None = None
    svd_cache_dir: str | None = None
    truncation_basis: str = "weight"
    calibration_samples: int = 128
    calibration_damping: float = 1e-6
    calibration_memory_gib: float = 4.0
    peft_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ranked = self.method not in METHOD_TABLE or METHOD_TABLE[self.method].ranked  # unknown: refused below
        for name, whole in NUMBER_SETTINGS.items():  # before the comparisons below, which a string or float would fail
            value = getattr(self, name)
            if (value is None and name == "truncation_rank") or (name == "rank" and not ranked):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
                raise ValueError(f"{name} must be {'a whole number' if whole else 'a number'}, got {value!r}")
        if self.truncation_rank is not None and self.truncation_rank < 1:
            raise ValueError(f"truncation_rank must be a positive integer or null, got {self.truncation_rank!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if METHOD_TABLE[self.method].ranked and self.rank < 1:  # a whole number (checked above)
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if METHOD_TABLE[self.method].ranked and not 0 < self.alpha < float("inf"):
            raise ValueError(f"alpha must be > 0 (the update is scaled by alpha / r; 0 would train nothing), got "
                             f"{self.alpha}")
        for name in ("beta", "gamma"):
            if not 0 <= getattr(self, name) < float("inf"):  # also refuses nan, which fails every comparison
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}: use 0 to switch the "
                                 "term off")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"unknown svd_method {self.svd_method!r}; choose one of: {', '.join(SVD_METHODS)}")
        if self.orth_form not in ORTH_FORMS:
            raise ValueError(f"unknown orth_form {self.orth_form!r}; choose one of: {', '.join(ORTH_FORMS)}")
        if self.truncation_basis not in TRUNCATION_BASES:
            raise ValueError(f"unknown truncation_basis {self.truncation_basis!r}; choose one of: "
                             f"{', '.join(TRUNCATION_BASES)}")
        if self.truncation_basis == "activation" and self.method not in TRUNCATING_METHODS:
            raise ValueError(f"truncation_basis=activation applies to the methods that truncate "
                             f"({', '.join(TRUNCATING_METHODS)}), not to {self.method!r}")
        for name, allowed, requirement in (("calibration_samples", self.calibration_samples >= 1, ">= 1"),
                                           ("calibration_damping", 0 <= self.calibration_damping < float("inf"),
                                            ">= 0 and finite"),
                                           ("calibration_memory_gib", self.calibration_memory_gib > 0, "> 0")):
            if not allowed:
                raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)}")
        if self.init not in KASA_INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of: {', '.join(KASA_INITS)}")
        self.target_modules, self.trainable_modules = map(_names, (self.target_modules, self.trainable_modules))
        self.fused_modules = {k: list(v) for k, v in dict(self.fused_modules).items()}
        self.peft_options = dict(self.peft_options or {})  # ignored by the methods kasa implements itself

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def removed_rank(self) -> int:
        """How many minor singular components the truncating methods (KaSA, svd_lora) remove."""
        return self.truncation_rank or self.rank

    @property
    def truncates(self) -> bool:
        """Whether the method removes minor components from W0 that no adapter holds (the truncation damage)."""
        return self.method in TRUNCATING_METHODS

    @property
    def uses_layers(self) -> bool:
        return METHOD_TABLE[self.method].ranked

    @property
    def uses_peft(self) -> bool:
        """Run through PEFT (kasa/adapters/peft_baselines.py) rather than kasa's own adapter layers."""
        return self.method in PEFT_METHODS

    @property
    def effective_beta(self) -> float:
        return self.beta if has_loss_weight(self.method, "beta") else 0.0

    @property
    def effective_gamma(self) -> float:
        return self.gamma if has_loss_weight(self.method, "gamma") else 0.0

    def unused_settings(self) -> dict[str, tuple[str, str]]:
        """The settings this run does not use, each with the setting that makes it so and where it applies:
        {setting: ("method=lora", "kasa, kasa_l2")}."""
        unused = {}
        for name, uses in METHOD_SETTINGS.items():
            if not uses(METHOD_TABLE[self.method]):
                users = [m.name for m in METHOD_TABLE.values() if uses(m)]
                others = [m.name for m in METHOD_TABLE.values() if not uses(m)]
                where = ", ".join(users) if len(users) <= len(others) else f"every method but {', '.join(others)}"
                unused[name] = (f"method={self.method}", where)
        if self.method not in TRUNCATING_METHODS:  # activation truncation is theirs alone: say so, not the basis
            where = f"truncation_basis=activation of the methods that truncate ({', '.join(TRUNCATING_METHODS)})"
            unused |= dict.fromkeys(CALIBRATION_SETTINGS, (f"method={self.method}", where))
        elif self.truncation_basis != "activation":
            unused |= dict.fromkeys(CALIBRATION_SETTINGS, (f"method.truncation_basis={self.truncation_basis}",
                                                           "truncation_basis=activation"))
        return unused

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown adapter option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**data)
