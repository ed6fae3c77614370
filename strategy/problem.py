"""The table every allocator works on: per tensor, per candidate type, exact bytes and predicted loss.

Why one table: budget, knee, ashq1 and the stock-like baseline must see the same bytes, the same constraints
and the same loss model, or comparing their plans "at the same size" would be comparing different things.

Rows are tensors whose type we choose (quantizable and measured); columns are GGUF types sorted by bits per
weight, cheapest first (so a tie in an argmin goes to the smaller type). `bytes` are padded data bytes
(sizes.pad), so `fixed_bytes + sum(bytes[i, choice[i]])` is the exact file size.

Predicted loss per (tensor, type) = scale(class, depth) * proxy. The default proxy is wmse * n_params: wmse is
the importance-weighted mean squared error of the round trip, so wmse * n_params * mean(importance) is
E||dW x||^2 for activations x distributed like the imatrix's. `proxies` holds the alternatives a calibration
may choose (see PROXIES); the calibration scale (1 when uncalibrated) maps the proxy to delta-KLD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from strategy.sizes import (
    ALIGNMENT,
    HEADER_BYTES,
    TensorMeta,
    bits_per_weight,
    fits_row,
    pad,
    padded_bytes,
    tensor_info_bytes,
)


class StrategyError(ValueError):
    """A request no plan can satisfy (budget below the minimum, contradictory constraints); says what to change."""


@dataclass
class Candidates:
    names: list[str]
    types: list[str]                 # columns, sorted by bits per weight (cheapest first)
    nbytes: np.ndarray               # (n, K) int64 padded data bytes; 0 where invalid
    err: np.ndarray                  # (n, K) float64 proxy error (wmse); nan where unmeasured
    loss: np.ndarray                 # (n, K) float64 predicted loss; inf where invalid
    valid: np.ndarray                # (n, K) bool
    n_params: np.ndarray             # (n,) int64
    classes: list[str]
    layers: list[int | None]
    fixed_bytes: int = 0             # header + kv + infos + every tensor not in `names`
    fixed_types: dict[str, str] = field(default_factory=dict)  # tensors whose type is not ours to choose
    n_layers: int = 0
    total_params: int = 0            # all tensors, for bpw figures
    notes: list[str] = field(default_factory=list)
    unmeasured: list[str] = field(default_factory=list)  # quantizable but not measured: fixed, still ours to write
    header_bytes: int = 0            # part of fixed_bytes that is not tensor data (header, kv, infos, padding)
    proxies: dict[str, np.ndarray] = field(default_factory=dict)  # proxy name -> (n, K) raw proxy, nan unmeasured

    @property
    def n(self) -> int:
        return len(self.names)

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def type_col(self, t: str) -> int:
        return self.types.index(t.upper())

    def min_bytes(self) -> int:
        b = np.where(self.valid, self.nbytes, np.iinfo(np.int64).max)
        return int(self.fixed_bytes + b.min(axis=1).sum())

    def max_bytes(self) -> int:
        b = np.where(self.valid, self.nbytes, 0)
        return int(self.fixed_bytes + b.max(axis=1).sum())

    def size_of(self, choice: np.ndarray) -> int:
        return int(self.fixed_bytes + self.nbytes[np.arange(self.n), choice].sum())

    def loss_of(self, choice: np.ndarray) -> float:
        return float(self.loss[np.arange(self.n), choice].sum())

    def choice_from_types(self, types: Mapping[str, str]) -> np.ndarray:
        cols = {t: j for j, t in enumerate(self.types)}
        out = np.empty(self.n, dtype=np.int64)
        for i, name in enumerate(self.names):
            t = types[name].upper()
            if t not in cols:
                raise StrategyError(f"tensor {name}: type {t} has no measurement; measure it or choose another")
            out[i] = cols[t]
            if not np.isfinite(self.err[i, out[i]]) and self.nbytes[i, out[i]] == 0:
                raise StrategyError(f"tensor {name}: type {t} has no measurement; measure it or choose another")
        return out

    def types_of(self, choice: np.ndarray) -> dict[str, str]:
        return {name: self.types[int(j)] for name, j in zip(self.names, choice)}

    def bpw_of(self, choice: np.ndarray) -> float:
        """Average bits per weight over all tensors' data, as llama.cpp reports it (metadata excluded)."""
        data = self.size_of(choice) - self.header_bytes
        return data * 8 / max(1, self.total_params)


# proxy name -> what it measures (all per tensor and type; bigger is worse)
PROXIES = {
    "wmse": "importance-weighted MSE x params (the uncalibrated default)",
    "out": "E||dW x||^2 = weighted MSE x params x mean importance (output error energy per token)",
    "mse": "plain MSE x params",
    "rel2": "squared relative error ||dW||^2 / ||W||^2",
}


def depth_of(layer: int | None, n_layers: int) -> float | None:
    if layer is None or n_layers <= 1:
        return None if layer is None else 0.0
    return layer / (n_layers - 1)


def build_candidates(measurements: Iterable, metas: Sequence[TensorMeta] | None = None, *,
                     metadata_bytes: int = 0, calibration=None, constraints=None,
                     types: Iterable[str] | None = None, align: int = ALIGNMENT,
                     unmeasured_type: str = "Q8_0", importance: Mapping[str, float] | None = None) -> Candidates:
    """Measurements (+ the model's full tensor list for exact size) -> the candidate table.

    Without `metas` the table covers only measured tensors and sizes are their padded measured bytes (good
    for --target-bpw and tests). With `metas`, non-quantizable tensors (F32 norms...) and their bytes count in
    `fixed_bytes`, types whose block does not divide the row length are excluded, and a quantizable tensor
    that was not measured is fixed at `unmeasured_type` (noted in `notes`). `importance` (tensor -> mean
    imatrix importance) enables the "out" proxy; without it that proxy equals "wmse".
    """
    rows: dict[str, dict[str, object]] = {}
    info: dict[str, tuple[int, str, int | None]] = {}
    for m in measurements:
        rows.setdefault(m.tensor, {})[m.qtype.upper()] = m
        info.setdefault(m.tensor, (int(m.n_params), m.tensor_class, m.layer))
    allowed_types = {t.upper() for t in types} if types is not None else None
    meta_by = {m.name: m for m in metas} if metas is not None else {}
    notes: list[str] = []
    fixed_types: dict[str, str] = {}
    unmeasured: list[str] = []

    if metas is not None:
        order = [m.name for m in metas if m.quantizable and m.name in rows]
        unknown = sorted(set(rows) - set(meta_by))
        if unknown:
            raise StrategyError(f"{len(unknown)} measured tensor(s) are not in the model (e.g. {unknown[0]}); "
                                f"the measurement db is for another model or another converter version")
        for m in metas:
            if not m.quantizable:
                fixed_types[m.name] = (m.fixed_type or "F32").upper()
            elif m.name not in rows:
                t = unmeasured_type if fits_row(unmeasured_type, m.n_per_row) else "F16"
                fixed_types[m.name] = t
                unmeasured.append(m.name)
                notes.append(f"{m.name}: not measured, kept at {t}")
    else:
        order = list(rows)

    all_types = sorted({t for r in rows.values() for t in r if allowed_types is None or t in allowed_types},
                       key=lambda t: (bits_per_weight(t), t))
    col = {t: j for j, t in enumerate(all_types)}
    n, k = len(order), len(all_types)
    nbytes = np.zeros((n, k), dtype=np.int64)
    err = np.full((n, k), np.nan)
    mse = np.full((n, k), np.nan)
    rel2 = np.full((n, k), np.nan)
    valid = np.zeros((n, k), dtype=bool)
    n_params = np.zeros(n, dtype=np.int64)
    classes: list[str] = []
    layers: list[int | None] = []
    for i, name in enumerate(order):
        npar, cls, layer = info[name]
        meta = meta_by.get(name)
        if meta is not None:
            cls = cls or meta.cls
            layer = layer if layer is not None else meta.layer
            npar = meta.n_params
        n_params[i] = npar
        classes.append(cls or _class_of(name))
        layers.append(layer if layer is not None else _layer_of(name))
        for t, m in rows[name].items():
            j = col.get(t)
            if j is None:
                continue
            if meta is not None:
                if not fits_row(t, meta.n_per_row):
                    continue
                nbytes[i, j] = padded_bytes(t, meta.shape, align)
            else:
                nbytes[i, j] = pad(int(m.n_bytes), align)
            err[i, j] = float(m.wmse)
            mse[i, j] = float(m.rmse) ** 2
            rel2[i, j] = float(m.rel_err) ** 2
            valid[i, j] = True
        if not valid[i].any():
            raise StrategyError(f"tensor {name}: no measured type fits its rows; measure a type whose block "
                                f"size divides {meta.n_per_row if meta else '?'}")

    header = 0
    fixed = 0
    total_params = int(n_params.sum())
    if metas is not None:
        header = pad(HEADER_BYTES + int(metadata_bytes) + sum(tensor_info_bytes(m.name, len(m.shape)) for m in metas),
                     align)
        fixed = header + sum(padded_bytes(t, meta_by[nm].shape, align) for nm, t in fixed_types.items())
        total_params = sum(m.n_params for m in metas)
    layer_ids = [x for x in layers if x is not None]
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    if metas is not None:
        ml = [m.layer for m in metas if m.layer is not None]
        n_layers = max(n_layers, max(ml) + 1 if ml else 0)

    npf = n_params[:, None].astype(np.float64)
    act = np.array([float((importance or {}).get(name, 1.0)) for name in order])[:, None]
    proxies = {"wmse": err * npf, "out": err * npf * act, "mse": mse * npf, "rel2": rel2}
    c = Candidates(names=order, types=all_types, nbytes=nbytes, err=err, loss=np.full((n, k), np.inf),
                   valid=valid, n_params=n_params, classes=classes, layers=layers, fixed_bytes=fixed,
                   fixed_types=fixed_types, unmeasured=unmeasured, n_layers=n_layers, total_params=total_params, notes=notes,
                   header_bytes=header, proxies=proxies)
    set_loss(c, calibration)
    if constraints is not None:
        constraints.apply(c, metas=meta_by)
    return c


def proxy_table(c: Candidates, name: str = "wmse") -> np.ndarray:
    """(n, K) raw proxy `name` (see PROXIES); nan where unmeasured."""
    if name not in PROXIES:
        raise StrategyError(f"unknown loss proxy {name!r}; choose one of {', '.join(PROXIES)}")
    if name in c.proxies:
        return c.proxies[name]
    if name in ("wmse", "out"):
        return c.err * c.n_params[:, None].astype(np.float64)
    raise StrategyError(f"proxy {name!r} needs measurements with that error column; re-run `python -m measure`")


def set_loss(c: Candidates, calibration=None) -> None:
    """loss = scale(class, depth) * proxy (wmse * n_params, scale 1 without calibration); inf where invalid."""
    scale = np.ones(c.n)
    proxy = "wmse"
    scale = scale[:, None] * np.ones((1, len(c.types)))
    if calibration is not None:
        proxy = getattr(calibration, "proxy", "wmse")
        for i, (cls, layer) in enumerate(zip(c.classes, c.layers)):
            scale[i, :] = calibration.scale(cls, layer, c.n_layers)
            for j, t in enumerate(c.types):  # per-type overrides measured by probes (strategy.calibrate)
                scale[i, j] = calibration.scale(cls, layer, c.n_layers, t)
            scale[i, :] *= getattr(calibration, "tensor_scales", {}).get(c.names[i], 1.0)
    raw = np.nan_to_num(proxy_table(c, proxy), nan=np.inf) * scale
    c.loss = np.where(c.valid, raw, np.inf)


def _class_of(name: str) -> str:
    from strategy.names import tensor_class

    return tensor_class(name)


def _layer_of(name: str) -> int | None:
    from strategy.names import layer_of

    return layer_of(name)
