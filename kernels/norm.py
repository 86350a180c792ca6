"""RMSNorm. The reference follows transformers' LlamaRMSNorm exactly (square in float32,
scale in the input dtype last), which is what keeps greedy tokens equal to theirs."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., D) in the model dtype; weight: (D,)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


rms_norm = rms_norm_ref
