"""Setting aiosfs up on a machine: the default model (`model.py`: fetched from its
package, re-encoded and proven), proof that the llama.cpp build runs here
(`buildcheck.py`, with `buildprobe.py` in its child), the perplexity that decides the
weight format (`quality.py`), the GPU check (`gpucheck/`), and what they share
(`kit.py`: child processes run to a deadline, file digests). scripts/setup drives them."""
