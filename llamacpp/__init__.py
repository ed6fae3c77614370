"""Everything that touches llama.cpp itself: the pinned upstream sources, the reference tools, libggml."""

PINNED_LLAMA_CPP_PYTHON = "0.3.36"
PINNED_LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
