"""Long-term memory. bank.py: MemoryBank, with exact, LSH and ANN lookup in the C++ core
(csrc/memory/). encoders.py: keys and value embeddings of a text from the model's own
embeddings. injection.py: retrieval inside generate() and where the retrieved memory embeddings
go in the model's input sequence."""
from .bank import Memory, MemoryBank

__all__ = ["Memory", "MemoryBank"]
