"""Engine backed by the reference `llama-perplexity` binary: --kl-divergence-base saves the base's log-probs;
a candidate is compared either from its own saved log-probs (when the text is known: deterministic, full
precision) or by --kl-divergence with its printed statistics parsed into `Metrics`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from verify import VerifyError
from verify.kld import Metrics, decode_logprobs, ppl_from_nll
from verify.logits_cache import BaseLogits, scored_per_chunk

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
_PM = r"\s*(?:±|\+/-)\s*"
_TS = re.compile(r"^\d+\.\d+\.\d+\.\d+ [IWEDT] ")  # llama.cpp's log timestamp prefix


def find_perplexity(explicit: str | os.PathLike | None = None) -> Path:
    """llama-perplexity from --llama-cpp (a binary or a build dir), the reference build, or PATH."""
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_file():
            return p
        for cand in (p / "llama-perplexity", p / "bin" / "llama-perplexity", p / "build" / "bin" / "llama-perplexity"):
            if cand.is_file():
                return cand
        raise VerifyError(f"{p}: no llama-perplexity there; pass the binary or the llama.cpp build directory")
    from llamacpp.reference import ReferenceNotFound, find_reference

    try:
        return find_reference().tool("llama-perplexity")
    except ReferenceNotFound:
        found = shutil.which("llama-perplexity")
        if found:
            return Path(found)
        raise VerifyError("llama-perplexity not found; build the reference with `python -m llamacpp.build`, "
                          "pass --llama-cpp DIR, or use --engine torch") from None


def _clean(line: str) -> str:
    return _TS.sub("", line.strip())


def error_line(output: str) -> str | None:
    """The most telling error line of a failed llama.cpp run, or None when it printed none."""
    lines = [_clean(ln) for ln in output.splitlines() if ln.strip()]
    for pat in ("error loading model", "failed to quantize:", "failed to read", "error:", "failed", "error",
                "unable"):
        for ln in lines:
            if pat in ln.lower():
                return ln
    return None


def failure_message(output: str) -> str:
    lines = [_clean(ln) for ln in output.splitlines() if ln.strip()]
    return error_line(output) or (lines[-1] if lines else "no output")


def _grab(pattern: str, text: str, what: str, n: int = 1) -> tuple[float, ...]:
    m = re.search(pattern, text)
    if not m:
        raise VerifyError(f"llama-perplexity output has no {what!r} line; is it a llama.cpp of another era?")
    return tuple(float(m.group(i + 1)) for i in range(n))


def parse_kld_output(text: str, n_tokens: int) -> Metrics:
    """The final statistics block of `llama-perplexity --kl-divergence`."""
    ppl, ppl_err = _grab(r"Mean PPL\(Q\)\s*:\s*" + _NUM + _PM + _NUM, text, "Mean PPL(Q)", 2)
    ppl_b, ppl_b_err = _grab(r"Mean PPL\(base\)\s*:\s*" + _NUM + _PM + _NUM, text, "Mean PPL(base)", 2)
    kld, kld_err = _grab(r"Mean\s+KLD:\s*" + _NUM + _PM + _NUM, text, "Mean KLD", 2)
    (kmax,) = _grab(r"Maximum KLD:\s*" + _NUM, text, "Maximum KLD")
    (k999,) = _grab(r"99\.9%\s+KLD:\s*" + _NUM, text, "99.9% KLD")
    (k99,) = _grab(r"99\.0%\s+KLD:\s*" + _NUM, text, "99.0% KLD")
    (kmed,) = _grab(r"Median\s+KLD:\s*" + _NUM, text, "Median KLD")
    (rms,) = _grab(r"RMS Δp\s*:\s*" + _NUM, text, "RMS Δp")
    top, top_err = _grab(r"Same top p:\s*" + _NUM + _PM + _NUM, text, "Same top p", 2)
    return Metrics(n_tokens=n_tokens, ppl=ppl, ppl_err=ppl_err, ppl_base=ppl_b, ppl_base_err=ppl_b_err,
                   kld_mean=kld, kld_err=kld_err, kld_median=kmed, kld_p99=k99, kld_p999=k999, kld_max=kmax,
                   same_top=top, same_top_err=top_err, rms_dp=rms)


ATTEMPTS = 3  # printed-statistics runs before giving up (compare() without the text)


def file_ppl(info: BaseLogits) -> Metrics:
    """Perplexity from a base log-prob file alone (its rounded log-probs of the scored tokens)."""
    first = info.n_ctx // 2
    nll = []
    for c in range(info.n_chunk):
        rows = np.asarray(info.rows[c])
        nxt = info.tokens[c, first + 1:]
        nll.append(-decode_logprobs(rows, info.n_vocab)[np.arange(nxt.size), nxt].astype(np.float64))
    return ppl_from_nll(np.concatenate(nll))


class LlamaCppEngine:
    name = "llamacpp"

    def __init__(self, binary: str | os.PathLike | None = None, threads: int | None = None, verbose: bool = False):
        self.binary = find_perplexity(binary)
        self.threads = threads
        self.verbose = verbose

    def _run(self, args: list[str], model: Path, text: Path | None = None) -> str:
        cmd = [str(self.binary), "-m", str(model), *args]
        if self.threads:
            cmd += ["-t", str(self.threads)]
        env = dict(os.environ)
        lib = self.binary.parent.parent / "lib"
        if lib.is_dir():
            env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
        if self.verbose:
            print("[llamacpp] " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
        out = proc.stdout + "\n" + proc.stderr
        if "need at least" in out and "tokens to evaluate perplexity" in out:
            m = re.search(r"tokenizes to only (\d+) tokens", out)
            n = m.group(1) if m else "too few"
            need = re.search(r"need at least (\d+) tokens", out)
            raise VerifyError(f"{text or 'text'}: tokenizes to only {n} tokens; perplexity needs at least "
                              f"{need.group(1) if need else 'twice --ctx'} (2 chunks of --ctx); use a longer text "
                              f"or a smaller --ctx")
        if proc.returncode != 0:
            msg = error_line(out) or self._load_diagnosis(model) or (
                f"llama-perplexity exited with status {proc.returncode} and no message")
            raise VerifyError(f"{model}: llama.cpp cannot evaluate it: {msg}")
        return out

    def _load_diagnosis(self, model: Path) -> str | None:
        """llama-perplexity's logger is asynchronous and often loses everything when loading fails; the
        reference llama-quantize loads through the same loader but logs synchronously, so ask it."""
        quantize = self.binary.parent / "llama-quantize"
        if not quantize.is_file():
            return None
        import tempfile

        with tempfile.TemporaryDirectory(prefix="verify-diag-") as td:
            proc = subprocess.run([str(quantize), str(model), str(Path(td) / "copy.gguf"), "COPY"],
                                  capture_output=True, text=True, errors="replace")
        if proc.returncode == 0:
            return None
        line = error_line(proc.stdout + "\n" + proc.stderr)
        return re.sub(r"^.*?failed to quantize:\s*", "", line) if line else None

    def run_base(self, base: Path, text: Path, n_ctx: int, n_chunks: int | None, out_raw: Path) -> dict:
        args = ["-f", str(text), "-c", str(n_ctx), "--kl-divergence-base", str(out_raw)]
        if n_chunks:
            args += ["--chunks", str(n_chunks)]
        out = self._run(args, base, text)
        if out_raw.is_file() and out_raw.stat().st_size == 12:
            # llama-perplexity writes magic + n_ctx, then finds the text too short (its message can be lost)
            raise VerifyError(f"{text}: tokenizes to fewer than {2 * n_ctx} tokens; perplexity needs at least "
                              f"{2 * n_ctx} (2 chunks of --ctx {n_ctx}); use a longer text or a smaller --ctx")
        if not out_raw.is_file():
            raise VerifyError(f"{base}: llama-perplexity gave no result: {failure_message(out)}")
        info = BaseLogits.open(out_raw)
        m = re.search(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM, out)
        if m:
            ppl, err = float(m.group(1)), float(m.group(2))
        else:  # the log line was lost at exit (see compare); the file's 16-bit log-probs give PPL to ~1e-4
            ppl_m = file_ppl(info)
            ppl, err = ppl_m.ppl, ppl_m.ppl_err
        return {"ppl": ppl, "ppl_err": err, "n_chunk": info.n_chunk, "n_vocab": info.n_vocab}

    def compare(self, model: Path, base_raw: Path, n_ctx: int, text: Path | None = None) -> Metrics:
        """Candidate vs base. With the text: llama-perplexity saves the candidate's 16-bit log-probs and
        `verify.kld` computes the statistics from the two files (deterministic, full precision, equal to
        llama.cpp's printed numbers to every digit it prints; see tests). Without it: llama-perplexity
        --kl-divergence and its printed statistics (6 decimals; its asynchronous logger sometimes drops
        them at exit, upstream issue 22142, so the run is repeated up to ATTEMPTS times)."""
        info = BaseLogits.open(base_raw)
        if info.n_chunk * scored_per_chunk(n_ctx) < 100:
            raise VerifyError(f"only {info.n_chunk * scored_per_chunk(n_ctx)} scored tokens; llama-perplexity "
                              f"prints KLD statistics from 100 on; use more --chunks or a larger --ctx")
        if text is not None:
            return self._compare_via_file(model, info, text)
        args = ["--kl-divergence-base", str(base_raw), "--kl-divergence", "-c", str(n_ctx)]
        out = ""
        for _ in range(ATTEMPTS):
            out = self._run(args, model)
            if "Same top p:" in out:
                return parse_kld_output(out, info.n_chunk * scored_per_chunk(n_ctx))
            if self.verbose:
                print("[llamacpp] statistics lost at exit, re-running", flush=True)
        raise VerifyError(f"{model}: llama-perplexity printed no KL statistics in {ATTEMPTS} runs "
                          f"(pass the text to compare() to use its saved log-probs instead): {failure_message(out)}")

    def _compare_via_file(self, model: Path, base: BaseLogits, text: Path) -> Metrics:
        """llama-perplexity saves the candidate's own 16-bit log-probs (written synchronously, never lost) and
        `verify.kld` compares the two files. Differs from llama.cpp's printed numbers only by the candidate's
        16-bit rounding (~1e-4 nats per entry, averaging out below the printed precision)."""
        import tempfile

        from verify.kld import TokenStats, compare_logits, summarize

        with tempfile.TemporaryDirectory(prefix="verify-cand-") as td:
            raw = Path(td) / "cand.kld"
            self._run(["-f", str(text), "-c", str(base.n_ctx), "--chunks", str(base.n_chunk),
                       "--kl-divergence-base", str(raw)], model, text)
            cand = BaseLogits.open(raw)
            if cand.tokens.shape != base.tokens.shape or not np.array_equal(cand.tokens, base.tokens):
                raise VerifyError(f"{model}: tokenizes the text differently from the base; same model?")
            first = base.n_ctx // 2
            parts = [compare_logits(decode_logprobs(np.asarray(cand.rows[c]), cand.n_vocab), np.asarray(base.rows[c]),
                                    base.tokens[c, first + 1:]) for c in range(base.n_chunk)]
        return summarize(TokenStats.concat(parts))
