"""`neoxq info`: what a GGUF holds and what this machine's llama.cpp build can do, as plain data."""

from __future__ import annotations

from pathlib import Path

from neoxq.core.gguf_info import read_info
from neoxq.core.machine import versions
from neoxq.runtime import capi


def describe_system() -> dict:
    devs = capi.devices()
    gpus = [d for d in devs if d["type"] != "CPU"]
    return {
        "backend": "CUDA" if any("CUDA" in d["name"].upper() for d in gpus) else ("GPU" if gpus else "CPU"),
        "devices": "; ".join(f"{d['name']} ({d['description']}, {d['total_bytes'] / 2**30:.1f} GiB)" for d in devs) or "none",
        "gpu_offload": capi.supports_gpu_offload(),
        "flash_attention": "on (--flash-attn auto, as llama.cpp resolves it; --flash-attn off turns it off)",
        "runtime_offloads": "all layers by default (--n-gpu-layers N, --device cpu)" if capi.supports_gpu_offload() else "no",
        "llama_cpp_python": versions().get("llama-cpp-python", "not installed"),
        "build": capi.system_info().strip(),
    }


def describe_file(path: Path) -> dict:
    info = read_info(path)
    m = info.metadata
    mix = {k[len("neoxq.mix.type.") :]: v for k, v in m.items() if k.startswith("neoxq.mix.type.")}
    return {
        "path": str(info.path),
        "architecture": info.arch,
        "type": m.get("neoxq.quant_type") or (info.quant_type.value if info.quant_type else "unknown"),
        "size_bytes": info.path.stat().st_size,
        "bits_per_weight": round(info.bpw, 3),
        "parameters": info.n_params,
        "context_length": info.context_length,
        "vocabulary": info.n_vocab,
        "source": " ".join(str(m[k]) for k in ("neoxq.source.repo", "neoxq.source.revision", "neoxq.source.commit") if m.get(k)) or "unknown",
        "imatrix": m.get("quantize.imatrix.file") or "none",
        "mix": f"{len(mix)} tensors, budget {m.get('neoxq.mix.target_bytes')} bytes" if mix else "no",
        "optimized": (
            f"{m['neoxq.optimize.method']} on {m.get('neoxq.optimize.calibration.tokens')} calibration tokens "
            f"(sha256 {str(m.get('neoxq.optimize.calibration.sha256'))[:16]}…) from {m.get('neoxq.optimize.reference')}, "
            f"damp {m.get('neoxq.optimize.damp')}, act order {m.get('neoxq.optimize.act_order')}"
            + (f", on {m['neoxq.optimize.device']}" if m.get("neoxq.optimize.device") else "")
        )
        if m.get("neoxq.optimize.method")
        else "no",
        "tensor_types": ", ".join(f"{t}: {n}" for t, n in sorted(_count(info).items())),
    }


def _count(info) -> dict:
    out: dict[str, int] = {}
    for t in info.tensors:
        out[t.type] = out.get(t.type, 0) + 1
    return out
