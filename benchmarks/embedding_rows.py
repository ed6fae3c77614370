#!/usr/bin/env python3
"""Per-row covariances for a tied token embedding, head and lookup roles together, scored role by role.

Why: on SmolLM2 the tied embedding carries about 40% of the Q5_K_M-size plan's KLD (docs/quality.md). Error
compensation encodes it with one covariance, the head's input sum_t h_t h_t^T, for every row. But KL's curvature in
logit v is p_v (1 - p_v), so row v's head error matters only where v is probable. And its lookup error matters
only where v occurs, weighted by the loss's Fisher G w.r.t. the input embedding. Row v's own objective is
therefore

    H_v = sum_t p_v(t) (1 - p_v(t)) h_t h_t^T  +  lambda * count_v * G  +  kappa * mean_t h_t h_t^T

(the last term shrinks rows with little evidence towards today's shared shape). The rows with the largest weight are
re-encoded with their own H_v; the rest keep the shared encoding. The script prints the KL of each role, and of both
(the tied model), with every other weight exact, on held-out texts. The statistics and the encoding are the
pipeline's own (`measure.embedding_rows`, `quants.compensate.quantize_compensated_rows`), which
`measure imatrix --embedding-rows` and the converter use.

    python benchmarks/embedding_rows.py --model ~/.cache/real-models/smollm2-bf16 \\
        --calib moby-dick.txt --held moby-dick.txt --held licences.txt

It reproduces the thirteenth session's numbers (docs/quality.md; licences.txt = GPL-3, Apache-2.0 and MPL-2.0 from
/usr/share/common-licenses): 5,000 rows at Q5_1, 2 minutes of statistics and 2 of encoding on 2 cores. A --held text
that is the --calib file is scored from its middle on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="HF checkpoint with a tied embedding")
    ap.add_argument("--calib", required=True, type=Path, help="calibration text (its first --chunks x 512 tokens)")
    ap.add_argument("--held", required=True, action="append", type=Path, help="held-out text(s) to score on")
    ap.add_argument("--type", default="Q5_1")
    ap.add_argument("--rows", type=int, default=5000, help="rows re-encoded with their own covariance")
    ap.add_argument("--kappa", type=float, default=10.0, help="pseudo-count of the shared covariance per row")
    ap.add_argument("--lam", type=float, default=1.0, help="weight of the lookup term")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--eval-chunks", type=int, default=6)
    ap.add_argument("--topk", type=int, default=256, help="tokens per position kept for the head term")
    a = ap.parse_args(argv)
    for path, what in ((a.model / "config.json", "HF checkpoint"), (a.calib, "calibration text"),
                       *((t, "held-out text") for t in a.held)):
        if not path.is_file():
            print(f"error: {path}: {what} not found", file=sys.stderr)
            return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quants
    from measure.embedding_rows import collect
    from quants.compensate import quantize_compensated, quantize_compensated_rows

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight.data_ptr() != emb.data_ptr() or not hasattr(model, "model"):
        print(f"error: {a.model}: needs a llama-style model (`model.model`) whose output head is tied to the token "
              f"embedding", file=sys.stderr)
        return 2
    E = emb.detach().numpy().copy()
    Et = torch.from_numpy(E)
    V, D = E.shape

    def chunks(path: Path, n: int, start: int = 0) -> list[list[int]]:
        ids = tok(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        return [ids[start + i * 512:start + (i + 1) * 512] for i in range(min(n, (len(ids) - start) // 512))]

    # the pipeline's own statistics and encoding (measure.embedding_rows, quants.compensate)
    t0 = time.time()
    calib = chunks(a.calib, a.chunks)
    if not calib:
        print(f"error: {a.calib}: shorter than one 512-token chunk; give a longer calibration text", file=sys.stderr)
        return 2
    stats = collect(model, calib, a.rows, topk=a.topk)
    print(f"statistics: {len(stats.hidden)} positions in {time.time() - t0:.0f}s", flush=True)
    torch.set_grad_enabled(False)

    qt = a.type
    H = stats.hidden.T.astype(np.float64) @ stats.hidden / len(stats.hidden)
    imp = np.diag(H).astype(np.float32)
    shared = quantize_compensated(E, qt, imp, H)
    t1 = time.time()
    per_row = quantize_compensated_rows(E, qt, imp, H, stats.row_covariances(H, lookup_weight=a.lam,
                                                                               shrink=a.kappa))
    print(f"{a.rows} rows re-encoded in {time.time() - t1:.0f}s (shared encoding included)", flush=True)

    def roles(q: np.ndarray, texts: list[Path]) -> list[tuple[float, float, float]]:
        Eq = torch.from_numpy(quants.dequantize(q, qt).reshape(V, D).astype(np.float32))
        out = []
        for t in texts:
            ids = tok(t.read_text(encoding="utf-8", errors="replace"))["input_ids"]
            start = len(ids) // 2 if t.resolve() == a.calib.resolve() else 0
            acc: list[list[torch.Tensor]] = [[], [], []]
            held = chunks(t, a.eval_chunks, start)
            if not held:
                raise SystemExit(f"error: {t}: shorter than one 512-token chunk (after its first half, for the "
                                 f"calibration text); give a longer held-out text")
            for ch in held:
                x = torch.tensor([ch])
                h0 = model.model(input_ids=x).last_hidden_state[0]
                h1 = model.model(inputs_embeds=Eq[x]).last_hidden_state[0]
                lp = torch.log_softmax(h0 @ Et.T, -1)
                for k, (hh, W) in enumerate(((h0, Eq), (h1, Et), (h1, Eq))):
                    lq = torch.log_softmax(hh @ W.T, -1)
                    acc[k].append((lp.exp() * (lp - lq)).sum(-1))
            out.append(tuple(float(torch.cat(z).mean()) for z in acc))
        return out

    print(f"{'encoding':36s} " + " | ".join(f"{t.name}: head / lookup / both" for t in a.held))
    for label, q in (("shared covariance", shared),
                     (f"per row ({a.rows}, kappa {a.kappa:g}, lambda {a.lam:g})", per_row)):
        r = roles(q, a.held)
        print(f"{label:36s} " + " | ".join(f"{h:.5f} / {lk:.5f} / {b:.5f}" for h, lk, b in r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
