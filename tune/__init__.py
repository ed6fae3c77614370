"""tune/: after convert, fit the float fields of a quantized GGUF end to end against its float base.

Layer-wise error compensation (quants/compensate.py) chooses each block's codes and scale for that matrix alone.
What it cannot see is the model: how errors of different tensors add up and what they do to the next-token
distribution. This stage keeps every integer code and fits only the float fields that sit beside them, the
block scales and minimums (fp16 `d` / `m` / `dmin`) and the F32 norm vectors, by gradient descent on
KL(base || quantized) over calibration chunks, with llama.cpp's 8-bit activation rounding emulated (straight
through). The result has the same types, sizes and codes: ggml decodes it as it decodes any file of those types.

The best state on held-out chunks is what gets written (step 0, the input file, included), so a tuned file
never measures worse than its input on text the tuning did not train on.
"""


class TuneError(ValueError):
    """Bad input (mismatched base, unsupported file, too little text); one line naming the file and the fix."""
