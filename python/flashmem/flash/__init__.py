"""Flash-offloaded FFN streaming ("LLM in a flash"): the FFN weights stay in the converted folder's
bundle file and the neurons a predictor picks are read per token. streaming.py configures the
engine's sparse FFN and reports its figures; calibrate.py fits the sparsity predictors
(`flashmem calibrate`). The runtime is C++, in csrc/ffn/."""
from .streaming import PREDICTOR_FILE, PREDICTOR_PARTS, UNBUNDLED_FILE, parse_bytes, write_unbundled

__all__ = ["PREDICTOR_FILE", "PREDICTOR_PARTS", "UNBUNDLED_FILE", "parse_bytes", "write_unbundled"]
