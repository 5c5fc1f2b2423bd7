"""flashmem: an inference engine for decoder LLMs on devices whose DRAM is smaller than the model.

    model = flashmem.load()                      # SmolLM2-135M-Instruct, fetched and converted once
    print(model.generate("The capital of France is", max_new_tokens=20).text)

Where each part lives:
    loading.py      load(): a path to a running model          model.py       Model: forward, generate()
    generation.py   the decode loop and GenerationResult       sampling.py    token sampling
    batching.py     BatchRunner: continuous batching           serving/       the OpenAI-compatible server
    tokenizer.py    tokenizer and chat templates               cli.py         the `flashmem` command
    checkpoints/    HF and GGUF sources, conversion, the store of converted models
    flash/          flash-offloaded FFN streaming: options, statistics, predictor calibration
    memory/         MemoryBank (exact, LSH and ANN lookup), memory encoders, memory injection
The native core is flashmem._core (csrc/).
"""
from __future__ import annotations

from .checkpoints.convert import convert
from .checkpoints.store import is_converted
from .generation import GenerationResult
from .loading import load
from .memory import Memory, MemoryBank
from .model import Model

__all__ = ["load", "convert", "Model", "GenerationResult", "is_converted", "MemoryBank", "Memory"]
__version__ = "0.1.0"
