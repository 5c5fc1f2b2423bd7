"""Long-term memory. bank.py: MemoryBank, with exact, LSH and ANN lookup in the C++ core
(csrc/memory/). encoders.py: keys and value embeddings of a text from the model's own
embeddings. retrieval.py: which memories a generate() call injects (dense + BM25 candidates,
the model's relevance check). injection.py: where the retrieved memory embeddings go in the
model's input sequence. conversation.py: ChatMemory, long-term memory of a conversation."""
from .bank import Memory, MemoryBank
from .conversation import ChatMemory

__all__ = ["ChatMemory", "Memory", "MemoryBank"]
