"""Full measurement of SmolLM2 (every quantizable tensor x the 14 default types, with an imatrix) vs the brute-force
way to get the same per-type numbers: running the reference llama-quantize --pure once per type.

Prints the wall times and ratio = ours / reference (target <= 0.5), for the exact measurement (--sample 1) and a
row-sampled one (--sample 0.25: a quarter of each big tensor's rows, sizes exact, errors estimated). The reference side is only llama-quantize's
own time (the conversion to GGUF and the imatrix are made beforehand and not timed; comparing the quantized
file against the original, which a user would also need, is not counted either).

    SMOLLM2_DIR=/tmp/smollm2 python benchmarks/bench_measure.py [--workers N] [--types Q4_K,...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from llamacpp.reference import find_reference
    from measure.roundtrip import DEFAULT_TYPES, parse_types
    from measure.run import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("SMOLLM2_DIR", "/tmp/smollm2"))
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES))
    ap.add_argument("--quantizer", default="numpy", help="backends to time, comma-separated (numpy, ggml)")
    ap.add_argument("--sample", default="1,0.25", help="row fractions to time, comma-separated (1 = exact)")
    ap.add_argument("--scaling-layers", type=int, default=12,
                    help="also time the first N layers with 1, 2, 4, ... workers up to --workers (0 = skip)")
    ap.add_argument("--keep", default=None, help="directory for the GGUF/imatrix/db (default: a temp dir)")
    a = ap.parse_args()
    model = Path(a.model)
    if not (model / "config.json").is_file():
        print(f"error: {model}: no model (set SMOLLM2_DIR or make one with ../shared/tools/make_real_model.py "
              f"--smollm2 --out /tmp/smollm2)", file=sys.stderr)
        return 2
    types = parse_types(a.types)
    ref = find_reference()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-measure-"))
    work.mkdir(parents=True, exist_ok=True)
    src = ref.prefix / "src"
    f32 = work / "model-f32.gguf"
    if not f32.is_file():
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32",
                        "--outfile", str(f32)], env=env, check=True, capture_output=True)
    imat = work / "imatrix.gguf"
    if not imat.is_file():
        subprocess.run([str(ref.tool("llama-imatrix")), "-m", str(f32), "-f", str(ROOT / "tests/data/calibration.txt"),
                        "-c", "128", "--chunks", "8", "-o", str(imat)], check=True, capture_output=True)

    # reference: llama-quantize once per type
    t_ref = 0.0
    per_type = {}
    for t in types:
        out = work / f"q-{t}.gguf"
        t0 = time.perf_counter()
        res = subprocess.run([str(ref.tool("llama-quantize")), "--pure", "--imatrix", str(imat), str(f32), str(out), t,
                              str(os.cpu_count())], capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if res.returncode != 0:
            print(f"llama-quantize {t} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        out.unlink()
        per_type[t] = dt
        t_ref += dt
    print("reference llama-quantize per type: " + ", ".join(f"{t} {s:.1f}s" for t, s in per_type.items()))

    print(f"reference: {len(types)} x llama-quantize in {t_ref:.1f}s ({os.cpu_count()} threads)", flush=True)
    runs = [(b, float(f)) for b in a.quantizer.split(",") for f in a.sample.split(",")]
    for backend, sample in runs:
        db = work / f"bench-{backend}-{sample:g}.db"
        for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
            p.unlink(missing_ok=True)
        t0 = time.perf_counter()
        s = run(model, db, imatrix_paths=[imat], types=types, workers=a.workers, progress=True, backend=backend,
                sample=sample)
        t_ours = time.perf_counter() - t0
        label = f"--quantizer {backend} --sample {sample:g}"
        print(f"ours ({label}): {s.n_tensors} tensors x {s.n_types} types ({s.computed} results, "
              f"{s.not_applicable} n/a) in {t_ours:.1f}s with {a.workers} workers")
        print(f"ratio ours/reference [{label}] = {t_ours / t_ref:.2f} (target <= 0.5)", flush=True)
    if a.scaling_layers > 0:
        scaling(model, imat, types, a.scaling_layers, a.workers, work)
    return 0


def scaling(model: Path, imat: Path, types: list[str], n_layers: int, max_workers: int, work: Path) -> None:
    """Throughput of the same exact measurement (the first n_layers blocks) with 1, 2, 4, ... workers."""
    import catalog
    from measure.run import run

    names = [i.name for i in catalog.list_tensors(model)
             if i.quantizable and i.layer is not None and i.layer < n_layers]
    counts = sorted({1, *[w for w in (2, 4, 8, 16, 32, 64) if w < max_workers], max_workers})
    base = None
    for w in counts:
        db = work / f"scaling-{w}.db"
        for p in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
            p.unlink(missing_ok=True)
        t0 = time.perf_counter()
        run(model, db, imatrix_paths=[imat], types=types, workers=w, progress=False, tensors=names)
        dt = time.perf_counter() - t0
        base = base or dt
        print(f"scaling: {len(names)} tensors ({n_layers} layers) x {len(types)} types, {w:2d} workers: {dt:6.1f}s, "
              f"speed-up {base / dt:.2f}x (ideal {w}x)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
