"""The one table of adaptation methods: what each one is and the facts the rest of kasa asks about it (which adapter
block it trains, whether it truncates the base weight, which loss weights it has, whether PEFT runs it, how tables
name it and where it stands in the paper's ablation ladder). Light on purpose: no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # in tables and plots
    description: str
    block: str | None = None  # kasa's own adapter block: "kasa" (KasaBlock) or "lora" (LoraBlock); None: no block
    truncates: bool = False  # removes minor singular components of W0 that no adapter holds
    loss_weights: tuple[str, ...] = ()  # beta scales L2 = sum(dSigma^2), gamma scales L3 (orthogonality)
    peft: bool = False  # runs through PEFT (the optional extra `peft`; kasa/adapters/peft_baselines.py)
    ablation_step: int | None = None  # position in the paper's figure 2 ladder (1 = LoRA ... 5 = KaSA)
    ranked: bool = True  # has an adapter rank r (full fine-tuning and BitFit have none)


# In the order of comparison tables: full fine-tuning, the baselines, then the ablation ladder up to KaSA.
METHOD_TABLE: dict[str, Method] = {m.name: m for m in (
    Method("full", "FFT", "full fine-tuning", ranked=False),
    Method("bitfit", "BitFit", "BitFit: biases only", ranked=False),
    Method("lora", "LoRA", "LoRA (A Kaiming-uniform, B zero)", block="lora", ablation_step=1),
    Method("adalora", "AdaLoRA", "AdaLoRA (PEFT): SVD-form LoRA, rank budget pruned to method.rank on average during "
           "training", peft=True),
    Method("dora", "DoRA", "DoRA (PEFT): LoRA plus a trained magnitude vector per output", peft=True),
    Method("vera", "VeRA", "VeRA (PEFT): frozen shared random projections, trained scaling vectors", peft=True),
    Method("pissa", "PiSSA", "PiSSA: principal r components in A, B; residual frozen", block="lora"),
    Method("milora", "MiLoRA", "MiLoRA: minor r components in A, B; principal part frozen", block="lora"),
    Method("svd_lora", "SVD + LoRA", "ablation: SVD truncation + LoRA", block="lora", truncates=True,
           ablation_step=2),
    Method("kasa_sv", "SVD + SV adaptation", "ablation: SVD truncation + singular-value adaptation (beta and gamma "
           "ignored)", block="kasa", truncates=True, ablation_step=3),
    Method("kasa_l2", "SVD + SV adaptation + L2", "ablation: SVD truncation + singular-value adaptation + L2 (gamma "
           "ignored)", block="kasa", truncates=True, loss_weights=("beta",), ablation_step=4),
    Method("kasa", "KaSA", "KaSA: SVD truncation + singular-value adaptation + L2 + L3", block="kasa",
           truncates=True, loss_weights=("beta", "gamma"), ablation_step=5),
)}

ABLATION_LADDER: tuple[str, ...] = tuple(
    sorted((m.name for m in METHOD_TABLE.values() if m.ablation_step), key=lambda n: METHOD_TABLE[n].ablation_step)
)


def methods_where(**flags: object) -> tuple[str, ...]:
    """The names of the methods whose attributes equal `flags`, in table order, e.g. methods_where(block="kasa")."""
    return tuple(m.name for m in METHOD_TABLE.values() if all(getattr(m, k) == v for k, v in flags.items()))
