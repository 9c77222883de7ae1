"""What a long run needs to know about itself, measured at logging steps without host syncs in
between: throughput, step time, model FLOPs utilisation, peak memory and how the router behaves.

Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): ``6 N + 12 L H Q T`` with N
the parameters a token uses (active parameters, for a mixture of experts), L layers, H heads, Q head
width and T the sequence length (attention's score and value products, forward and backward).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a name fragment of
# torch.cuda.get_device_name(); the first fragment that matches wins. --peak_tflops overrides.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0))


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: ``override`` if given, else the table; None on a CPU
    or an unknown GPU (MFU is then not reported)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for fragment, tflops in PEAK_BF16_TFLOPS if fragment in name), None)


def flops_per_token(active_parameters: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    return 6.0 * active_parameters + 12.0 * num_layers * num_heads * head_dim * seq_len


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory since the last call: CUDA's max allocated (then reset), or the process's peak RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory/peak_allocated_gib": peak / 2**30}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"memory/peak_rss_gib": rss_kib / (2**30 if sys.platform == "darwin" else 2**20)}


class Throughput:
    """Tokens/s, step time and MFU between two logging steps (host clock; a logging step syncs anyway).

    Args:
        world_size: processes (devices) of the run.
        flops_per_token: from :func:`flops_per_token`, or None when unknown.
        peak: the device's peak TFLOP/s, or None (no MFU).
    """

    def __init__(self, world_size: int, flops_per_token: float | None, peak: float | None):
        self.world_size, self.flops_per_token, self.peak = world_size, flops_per_token, peak
        self._time = self._step = self._tokens = None

    def start(self, step: int, tokens: int) -> None:
        self._time, self._step, self._tokens = time.perf_counter(), step, tokens

    def metrics(self, step: int, tokens: int) -> dict[str, float | None]:
        """Figures since :meth:`start` or the previous call."""
        now = time.perf_counter()
        if self._time is None or step <= self._step:
            self.start(step, tokens)
            return {}
        elapsed = max(now - self._time, 1e-9)
        tokens_per_second = (tokens - self._tokens) / elapsed
        per_device = tokens_per_second / self.world_size
        mfu = None
        if self.flops_per_token and self.peak:
            mfu = per_device * self.flops_per_token / (self.peak * 1e12)
        out = {"tokens_per_second": tokens_per_second, "tokens_per_second_per_device": per_device,
               "step_time": elapsed / (step - self._step), "mfu": mfu}
        self.start(step, tokens)
        return out


class RouterStats:
    """The routers' balance loss and expert load, summed on the device over a logging interval's
    micro-batches (no host sync), reported at the logging step.

    Our MoE reports ``expert_load`` [layers, experts]; a transformers MoE with ``output_router_logits``
    reports each layer's ``router_logits`` [tokens, experts], whose top ``experts_per_token`` choices
    are counted here (on the device, as the model routes them).
    """

    def __init__(self, experts_per_token: int = 0):
        self.experts_per_token = experts_per_token
        self.load: torch.Tensor | None = None
        self.aux: torch.Tensor | None = None
        self.micro_batches = 0

    def _load_from_logits(self, logits) -> torch.Tensor | None:
        if not self.experts_per_token or not logits or not all(torch.is_tensor(x) for x in logits):
            return None
        counts = []
        for layer in logits:
            chosen = layer.detach().topk(self.experts_per_token, dim=-1).indices.reshape(-1)
            counts.append(torch.zeros(layer.shape[-1], device=layer.device, dtype=torch.long)
                          .scatter_add_(0, chosen, torch.ones_like(chosen)))
        return torch.stack(counts)

    def add(self, output) -> None:
        """Count one forward's expert load and ``aux_loss`` (models without them are skipped)."""
        if torch.is_tensor(output) or isinstance(output, dict) and not hasattr(output, "loss"):
            return
        load, aux = getattr(output, "expert_load", None), getattr(output, "aux_loss", None)
        if load is None:
            load = self._load_from_logits(getattr(output, "router_logits", None))
        if load is None or aux is None:
            return
        load, aux = load.detach(), aux.detach().float()
        self.load = load if self.load is None else self.load + load
        self.aux = aux if self.aux is None else self.aux + aux
        self.micro_batches += 1

    def metrics(self, accelerator) -> dict[str, float]:
        """Balance loss (mean) and, per layer, max/mean slots per expert over all processes (1.0 is
        perfectly even; ``num_experts`` means one expert got everything). A collective call."""
        if self.load is None:
            return {}
        load = accelerator.reduce(self.load, reduction="sum").float()
        aux = accelerator.reduce(self.aux / self.micro_batches, reduction="mean")
        imbalance = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()
        self.load, self.aux, self.micro_batches = None, None, 0
        out = {"router/aux_loss": float(aux), "router/imbalance_max": max(imbalance)}
        out.update({f"router/imbalance/layer_{i}": v for i, v in enumerate(imbalance)})
        return out
