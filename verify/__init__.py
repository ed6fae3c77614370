"""Evaluate GGUF files: perplexity and KL-divergence against a base model, as llama-perplexity does.

Engines: the reference `llama-perplexity` binary (`verify.llamacpp_engine`) and a pure-Python torch forward
over the GGUF's dequantized weights (`verify.torch_engine`). Base log-probs are cached on disk
(`verify.logits_cache`) so many candidates re-run the base once. `verify.probe` swaps round-tripped
tensors into a loaded model for the strategy's calibration probes. `python -m verify --help` for the CLI.
"""

from __future__ import annotations


class VerifyError(RuntimeError):
    """A user-facing problem (bad text, mismatched vocabularies, unloadable GGUF); printed as one line."""
