"""What gets quantised: every weight-bearing parameter of any ``nn.Module``, and a record of the rest.

The unit is the *parameter*, not the layer type: Linear/Conv/ConvTranspose weights,
``MultiheadAttention``'s packed ``in_proj_weight``, RNN/LSTM/GRU weights of every layer and
direction, embeddings, Hugging Face ``Conv1D``, a module's own ``nn.Parameter`` (cls tokens,
position embeddings) — all are found by walking the parameters, so no layer type is missed.
Each parameter gets a *role*:

* ``"weight"`` / ``"bias"`` (names containing ``bias``) — quantised by default;
* ``"norm"`` — affine parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm,
  RMSNorm, any class named ``*Norm``): quantised only when the method's ``quantise_norms`` is on;
* ``"float"`` — kept float on purpose (registered with :func:`register_layer`).

A tensor shared by several modules (one module used twice, or tied weights) is one entry with
its aliases: it is fixed once and stays shared. Non-floating and zero-sized tensors hold no
weight and are skipped. ``include``/``exclude`` patterns (fnmatch on qualified parameter or
module names, e.g. ``"classifier.*"``) narrow the choice. Everything not quantised is listed
with the reason, logged at the start of a run and summarised in the report; ``strict`` refuses
to start when anything would stay float.

A layer type needs registering only to change the defaults, e.g. a learned temperature that
must stay float::

    pwfn.register_layer(MyHead, roles={"temperature": "float"})
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from torch import nn

import bayes

from ..common.hints import setting
from ..errors import ModelError

log = logging.getLogger(__name__)

ROLES = ("weight", "bias", "norm", "float")

_ROLE_OVERRIDES: dict[Union[type, str], dict[str, str]] = {}


def register_layer(owner: Union[type, str], roles: Mapping[str, str]) -> None:
    """Override the role of parameters of a module type (a class or its ``"pkg.mod.Class"`` name).

    ``roles`` maps parameter-name patterns (fnmatch, e.g. ``"temperature"``, ``"scale_*"``) to
    one of ``"weight"``, ``"bias"``, ``"norm"``, ``"float"``.
    """
    bad = {k: v for k, v in roles.items() if v not in ROLES}
    if bad:
        raise ModelError(f"register_layer: unknown roles {bad}; choose from {list(ROLES)}")
    _ROLE_OVERRIDES[owner] = dict(roles)


def _owner_class(module: nn.Module) -> type:
    cls = type(module)
    # parametrized modules get a generated subclass; report the user's class
    while cls.__name__.startswith("Parametrized") and cls.__bases__:
        cls = cls.__bases__[0]
    return cls


def role_of(module: nn.Module, attr: str) -> str:
    """The role of ``module.<attr>``: a registered override, else ``norm`` for normalisation layers,
    ``bias`` for names containing "bias", ``weight`` otherwise."""
    for cls in type(module).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            table = _ROLE_OVERRIDES.get(key)
            if table:
                for pattern, role in table.items():
                    if fnmatch.fnmatchcase(attr, pattern):
                        return role
    if bayes.is_norm_module(module):
        return "norm"
    return "bias" if "bias" in attr else "weight"


#: tensors named in one grouped stays-float warning; the rest are counted
LISTED = 20


@dataclass
class TensorCoverage:
    """One distinct parameter tensor and whether (and why not) it is quantised. ``numel`` counts the real
    values it stores (a complex entry is two), ``bytes`` its size in its own dtype."""

    name: str
    owner: str
    owner_type: str
    role: str
    numel: int
    bytes: int
    dtype: str
    quantised: bool
    reason: Optional[str] = None
    aliases: list[str] = field(default_factory=list)


@dataclass
class Coverage:
    """The quantised and float parameters of a model, plus its persistent buffers."""

    tensors: list[TensorCoverage]
    buffer_numel: int = 0
    buffer_bytes: int = 0

    @property
    def quantised(self) -> list[TensorCoverage]:
        return [t for t in self.tensors if t.quantised]

    @property
    def left_float(self) -> list[TensorCoverage]:
        return [t for t in self.tensors if not t.quantised]

    @property
    def names(self) -> list[str]:
        """Qualified names of the quantised tensors (one per shared tensor), in model order."""
        return [t.name for t in self.quantised]

    def shared(self) -> dict[str, list[str]]:
        """Canonical name -> its other names, for every tensor held under several names."""
        return {t.name: list(t.aliases) for t in self.tensors if t.aliases}

    def summary(self) -> dict[str, Any]:
        """The report section: shares of parameters and bytes, by owner type, and the float list."""
        total_n = sum(t.numel for t in self.tensors)
        total_b = sum(t.bytes for t in self.tensors)
        q_n = sum(t.numel for t in self.quantised)
        q_b = sum(t.bytes for t in self.quantised)
        by_type: dict[str, dict[str, Any]] = {}
        for t in self.tensors:
            row = by_type.setdefault(t.owner_type, {"parameters": 0, "quantised": 0, "bytes": 0,
                                                    "quantised_bytes": 0, "tensors": 0})
            row["parameters"] += t.numel
            row["bytes"] += t.bytes
            row["tensors"] += 1
            if t.quantised:
                row["quantised"] += t.numel
                row["quantised_bytes"] += t.bytes
        for row in by_type.values():
            row["share"] = row["quantised"] / row["parameters"] if row["parameters"] else 1.0
        return {
            "parameters": total_n,
            "quantised_parameters": q_n,
            "share": q_n / total_n if total_n else 1.0,
            "parameter_bytes": total_b,
            "quantised_bytes": q_b,
            "byte_share": q_b / total_b if total_b else 1.0,
            "buffers": {"numel": self.buffer_numel, "bytes": self.buffer_bytes},
            "by_owner_type": dict(sorted(by_type.items())),
            "left_float": [
                {"name": t.name, "owner_type": t.owner_type, "numel": t.numel, "reason": t.reason}
                for t in self.left_float
            ],
            "shared": self.shared(),
            "tensors": [asdict(t) for t in self.tensors],
        }

    def log(self, method: str) -> None:
        """Log the quantised share, the tensors that stay float (one warning per reason, listing them with
        their count, so forty norm layers do not bury the warnings that matter) and the shared tensors."""
        s = self.summary()
        log.info("%s: quantising %d of %d parameters (%.1f%%) in %d tensors", method, s["quantised_parameters"],
                 s["parameters"], 100 * s["share"], len(self.quantised))
        groups: dict[str, list[TensorCoverage]] = {}
        for t in self.left_float:
            groups.setdefault(str(t.reason), []).append(t)
        for reason, group in groups.items():
            if len(group) == 1:
                t = group[0]
                log.warning("%s: %s (%s, %d values) stays float: %s", method, t.name, t.owner_type, t.numel, reason)
                continue
            names = ", ".join(t.name for t in group[:LISTED])
            if len(group) > LISTED:
                names += f" and {len(group) - LISTED} more (the report's coverage.left_float lists every one)"
            owners = ", ".join(sorted({t.owner_type for t in group}))
            log.warning("%s: %d tensors (%s; %d values) stay float: %s: %s", method, len(group), owners,
                        sum(t.numel for t in group), reason, names)
        for name, aliases in s["shared"].items():
            log.info("%s: %s is shared with %s: fixed once, stays shared", method, name, ", ".join(aliases))

    def require_complete(self, method: str) -> None:
        """``strict``: refuse when anything would stay float."""
        left = self.left_float
        if left:
            shown = "; ".join(f"{t.name} ({t.owner_type}, {t.numel}): {t.reason}" for t in left[:5])
            more = f" (+{len(left) - 5} more)" if len(left) > 5 else ""
            raise ModelError(f"{method}: strict coverage is on, but {len(left)} tensors would stay float: "
                             f"{shown}{more}. Quantise them (see the reasons) or turn strict off.")


def _matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def plan(
    model: nn.Module,
    *,
    quantise_norms: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    norms_option: str = "quantise_norms",
) -> Coverage:
    """Decide, for every distinct parameter of ``model``, whether it is quantised (see module docs).

    ``include``/``exclude`` are fnmatch patterns on qualified parameter names and on their
    owners' module names; an explicit include admits norm parameters it names.
    """
    inc, exc = list(include or ()), list(exclude or ())
    tensors: list[TensorCoverage] = []
    for site in bayes.parameter_sites(model):
        t = site.tensor
        if t.numel() == 0:
            continue
        names = [site.name, *site.aliases]
        owner_names = [mn for mn, _, _ in site.owners]
        roles = {role_of(m, a) for _, m, a in site.owners}
        role = "float" if "float" in roles else "norm" if "norm" in roles else "bias" if roles == {"bias"} else "weight"
        reason: Optional[str] = None
        # values: the real numbers a tensor stores (a complex entry is two), so shares and sizes stay honest
        values = t.numel() * (2 if t.is_complex() else 1)
        dtype = str(t.dtype).replace("torch.", "")
        if t.is_complex():
            reason = (f"complex ({dtype}): pwfn's codebook is real, so it stays float ({t.numel()} entries = {values} "
                      f"real values, {t.numel() * t.element_size()} bytes). To fix it, hold its real and imaginary "
                      "parts as two real parameters and combine them with torch.complex(re, im) in forward")
        elif not t.is_floating_point():
            reason = f"not floating point ({t.dtype})"
        elif exc and _matches(names + owner_names, exc):
            reason = f"excluded by a pattern in {exc}"
        elif inc and not _matches(names + owner_names, inc):
            reason = f"not matched by the include patterns {inc}"
        elif role == "float":
            reason = "registered to stay float (pwfn.register_layer)"
        elif role == "norm" and not quantise_norms and not inc:
            reason = f"normalisation-layer parameter (quantised with {setting(norms_option, True)})"
        tensors.append(TensorCoverage(
            name=site.name, owner=site.module_name, owner_type=_owner_class(site.module).__name__, role=role,
            numel=values, bytes=t.numel() * t.element_size(), dtype=dtype,
            quantised=reason is None, reason=reason, aliases=list(site.aliases)))
    buf_n = buf_b = 0
    seen: set[int] = set()
    for module in model.modules():
        for bname, buf in module._buffers.items():
            if buf is None or id(buf) in seen or bname in module._non_persistent_buffers_set:
                continue
            seen.add(id(buf))
            buf_n += buf.numel()
            buf_b += buf.numel() * buf.element_size()
    return Coverage(tensors, buf_n, buf_b)
