"""Helpers shared by the benchmarks: test text, GGUF re-export, result files and plots."""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def shakespeare() -> str:
    base = Path(os.environ.get("FLASHMEM_SHARED", ROOT.parent / "shared"))
    return (base / "data" / "tinyshakespeare.txt").read_text()


def write_dequantized_gguf(src: str, dst: str, dtype: str) -> str:
    """Writes `src` (any llama GGUF) as an F32 or F16 GGUF holding the same dequantized weights,
    in llama.cpp's own tensor layout, with all metadata copied. 1-D tensors stay F32."""
    import gguf

    if os.path.isfile(dst):
        return dst
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst + ".part", "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    for t in r.tensors:
        x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        x = x.reshape(tuple(int(s) for s in reversed(t.shape)))
        w.add_tensor(t.name, x if (dtype == "f32" or x.ndim == 1) else x.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".part", dst)
    return dst


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def median(xs):
    return float(statistics.median(xs))


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(data, indent=1))
    return p
