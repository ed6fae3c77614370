"""Small typed records that stages exchange (measurement rows), so no stage reads another's internals."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Measurement:
    """One tensor round-tripped through one GGUF type.

    wmse is the importance-weighted MSE: sum_ij imp_j * err_ij^2 / sum_ij imp_j (plain MSE without an imatrix);
    rel_err = ||err|| / ||W||; cos = cosine similarity of W and its round trip.
    """

    tensor: str          # GGUF tensor name, exactly as the converter emits it
    qtype: str           # GGUF type name, e.g. "Q4_K"
    n_params: int
    n_bytes: int         # bytes of this tensor's data in the GGUF file at this type
    bpw: float
    rmse: float
    max_abs_err: float
    wmse: float
    rel_err: float
    cos: float
    tensor_class: str = ""   # attn_q, ffn_down, ffn_down_exps, token_embd, output...
    layer: int | None = None  # block index, None for non-block tensors
    sample: float = 1.0      # fraction of the tensor's rows round-tripped (1.0: every row; < 1: estimates)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
