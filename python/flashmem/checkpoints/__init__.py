"""Model checkpoints: the sources flashmem reads (HF folders, GGUF files), safetensors I/O, the
conversion into flashmem's own folder (convert.py, which documents the folder), the store of
converted models, and the default model."""
