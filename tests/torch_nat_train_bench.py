"""Training throughput of the PyTorch NAT / DiNAT, the baseline beside ``train.py --bench``.

The model is ``tests/torch_nat.py``'s, shaped like a ``jnat.models.VARIANTS`` entry, with
its gather-and-mask attention swapped for the fastest one this torch offers:

  flex     ``torch.nn.attention.flex_attention`` with a neighbourhood ``BlockMask`` and the
           relative positional bias as a ``score_mod`` (CUDA only: torch's flex attention
           has no CPU backward);
  natten   NATTEN's ``na{1,2,3}d``, without rpb (NATTEN 0.20 removed it);
  gather   the reference gather-and-mask attention of ``tests/torch_nat.py``.

``--attention auto`` picks the first that can train here and passes over one whose
device check raises. The check, before timing: the attention (compiled as the model runs
it) against the gather reference on the device, output and gradients in float32; the exit
status is 1 when they disagree. Steps are AdamW (weight decay 0.05, none on norms, biases
and rpb), label smoothing 0.1 and gradient clipping at 5 on one device-resident batch of
random images, under ``torch.autocast`` for bfloat16 and float16; warm-up steps, which
include compilation, are timed apart. Unlike jnat's recipe there is no stochastic depth
and no Mixup/CutMix (cheap next to the model).

  python tests/torch_nat_train_bench.py --model nat_tiny --batch 128 --dtype bfloat16 \\
      --steps 20 --out torch_nat_tiny.json

Prints one line of JSON and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import torch_nat

try:
  from torch.nn.attention import flex_attention as flex
except ImportError:  # torch < 2.5
  flex = None

try:
  import natten
except ImportError:
  natten = None

_START = time.perf_counter()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("blocks", "attention", "none")


def log(message):
  """Progress on stderr, so that a run cut off by a time limit shows how far it got."""
  print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- NATTEN's neighbourhood as flex_attention mask_mod / score_mod ---------------------------

def _coords(index, shape):
  """Row-major coordinates of a flat token index."""
  coords = []
  for size in reversed(shape):
    coords.append(index % size)
    index = index // size
  return coords[::-1]


def _axis_window(qi, length, kernel, stride, dilation, causal):
  """Query ``qi``'s dilation group, index in the group and first window slot on one axis.

  Tensor twin of ``torch_nat._axis_neighbours``: the window sits on the query's stride
  block (its centre, or its last query when causal), shifted inward at the borders.
  """
  group, gi = qi % dilation, qi // dilation
  last = (length - group + dilation - 1) // dilation - 1  # last index in the group
  block = gi - gi % stride
  if causal:
    start = torch.clamp(torch.minimum(block + stride - 1, last) - kernel + 1, min=0)
  else:
    start = torch.clamp(torch.minimum(block + stride // 2, last) - kernel // 2, min=0)
    start = torch.minimum(start, last + 1 - kernel)
  return group, gi, start


def neighbourhood_mask_mod(shape, kernel_size, stride, dilation, is_causal):
  """``mask_mod(b, h, q_idx, kv_idx)``: whether the key is in the query's neighbourhood."""

  def mask_mod(b, h, q_idx, kv_idx):
    inside = True
    for qi, ki, *axis in zip(_coords(q_idx, shape), _coords(kv_idx, shape), shape,
                             kernel_size, stride, dilation, is_causal):
      length, kernel, _, dil, causal = axis
      group, gi, start = _axis_window(qi, *axis)
      slot = ki // dil
      inside = inside & (ki % dil == group) & (slot >= start) & (slot < start + kernel)
      if causal:
        inside = inside & (slot <= gi)
    return inside

  return mask_mod


def rpb_score_mod(rpb, shape, kernel_size, dilation):
  """``score_mod`` adding ``rpb[h, *(key slot - query slot + K - 1)]``, NATTEN's bias."""

  def score_mod(score, b, h, q_idx, kv_idx):
    index = []
    for qi, ki, kernel, dil in zip(_coords(q_idx, shape), _coords(kv_idx, shape),
                                   kernel_size, dilation):
      # Clamped so that keys outside the neighbourhood (masked anyway) read in bounds.
      index.append(torch.clamp(ki // dil - qi // dil + kernel - 1, 0, 2 * kernel - 2))
    return score + rpb[(h, *index)]

  return score_mod


_BLOCK_MASKS = {}


def neighbourhood_block_mask(shape, kernel_size, stride, dilation, is_causal, device):
  """The ``BlockMask`` of one neighbourhood, built once per geometry and device.

  A plain dict rather than ``functools.lru_cache``: compiled code reads a dict entry
  built by an eager call, where it would trace through an lru_cache and rebuild the mask.
  """
  key = (shape, kernel_size, stride, dilation, is_causal, str(device))
  if key not in _BLOCK_MASKS:
    tokens = math.prod(shape)
    _BLOCK_MASKS[key] = flex.create_block_mask(
        neighbourhood_mask_mod(shape, kernel_size, stride, dilation, is_causal),
        None, None, tokens, tokens, device=device)
  return _BLOCK_MASKS[key]


def _check_window_fits(shape, kernel_size, dilation):
  for axis, (length, kernel, dil) in enumerate(zip(shape, kernel_size, dilation)):
    if length < kernel * dil:
      raise ValueError(f"spatial axis {axis} has {length} tokens: it must have at least "
                       f"kernel_size * dilation = {kernel * dil}")


def flex_neighbourhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, scale,
                                 rpb, flex_fn=None):
  """``torch_nat.neighbourhood_attention``'s semantics through flex_attention.

  Heads-last ``[B, *spatial, H, D]`` in and out. ``flex_fn`` is flex_attention itself
  (default) or a compiled one.
  """
  b, *shape, heads, dim = q.shape
  shape = tuple(shape)
  flat = lambda t: t.reshape(b, -1, heads, dim).transpose(1, 2)
  block_mask = neighbourhood_block_mask(shape, tuple(kernel_size), tuple(stride),
                                        tuple(dilation), tuple(is_causal), q.device)
  score_mod = None if rpb is None else rpb_score_mod(rpb, shape, kernel_size, dilation)
  out = (flex_fn or flex.flex_attention)(flat(q), flat(k), flat(v), score_mod=score_mod,
                                         block_mask=block_mask, scale=scale)
  return out.transpose(1, 2).reshape(q.shape)


def natten_neighbourhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, scale,
                                   rpb):
  """NATTEN's fused ``na{1,2,3}d`` on heads-last tensors; it has no rpb."""
  if rpb is not None:
    raise ValueError("rpb must be None with natten attention: NATTEN >= 0.20 has no rpb")
  na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[q.ndim - 3]
  return na(q, k, v, kernel_size=tuple(kernel_size), stride=tuple(stride),
            dilation=tuple(dilation), is_causal=tuple(is_causal), scale=scale)


# --- the model -------------------------------------------------------------------------------

class SwappedAttention(nn.Module):
  """A ``torch_nat.NeighborhoodAttention`` (its weights) run through another attention.

  Unlike the reference module it does not pad inputs smaller than the window: the
  benchmark's image sizes never need it.
  """

  def __init__(self, module, attend):
    super().__init__()
    self.module = module
    self.attend = attend

  def forward(self, x):
    m = self.module
    b, *shape, c = x.shape
    _check_window_fits(shape, m.kernel_size, m.dilation)
    q, k, v = m.qkv(x).reshape(b, *shape, 3, m.num_heads, m.head_dim).unbind(-3)
    out = self.attend(q, k, v, m.kernel_size, m.stride, m.dilation, m.is_causal, m.scale, m.rpb)
    return m.proj(out.reshape(b, *shape, c))


def available_attentions(device):
  """Attentions that can train on ``device``, fastest first."""
  names = []
  if flex is not None and device.type == "cuda":
    names.append("flex")
  if natten is not None and device.type == "cuda":
    names.append("natten")
  return names + ["gather"]


def attention_fn(name, compile_mode):
  if name == "flex":
    flex_fn = flex.flex_attention
    if compile_mode == "attention":
      flex_fn = torch.compile(flex.flex_attention, dynamic=False)
    return functools.partial(flex_neighbourhood_attention, flex_fn=flex_fn)
  if name == "natten":
    return natten_neighbourhood_attention
  return torch_nat.neighbourhood_attention


def build_model(variant_name, attention, compile_mode, num_classes=1000):
  """``tests/torch_nat.NAT`` shaped like ``jnat.models.VARIANTS[variant_name]``."""
  from jnat import models  # pylint: disable=import-outside-toplevel  (shapes only)
  if variant_name not in models.VARIANTS:
    raise ValueError(f"model={variant_name!r} must be one of {sorted(models.VARIANTS)}")
  v = models.VARIANTS[variant_name]()
  net = torch_nat.NAT(v.embed_dim, v.mlp_ratio, list(v.depths), list(v.num_heads),
                      v.kernel_size, [list(d) for d in v.dilations] if v.dilations else None,
                      num_classes=num_classes, layer_scale=v.layer_scale)
  attend = attention_fn(attention, compile_mode)
  for level in net.levels:
    for block in level.blocks:
      if attention == "natten":
        block.attn.rpb = None
      block.attn = SwappedAttention(block.attn, attend)
  return net


def compile_blocks(net):
  """Regional compilation: each transformer block, whose code is shared by all blocks."""
  config = torch._dynamo.config  # pylint: disable=protected-access
  # One compiled variant per level and dilation: DiNAT-Tiny has 7, past the default limit.
  for limit in ("recompile_limit", "cache_size_limit"):
    if hasattr(config, limit):
      setattr(config, limit, max(getattr(config, limit), 64))
  for level in net.levels:
    for block in level.blocks:
      block.compile(dynamic=False)


# --- the device check and the benchmark ------------------------------------------------------

def check_attention(attend, device, seed=0):
  """Max |error| of ``attend`` vs the gather reference, output and gradients, float32.

  One 2D case with every feature the models use, and stride and a causal axis besides:
  kernel 7, dilation (2, 1), rpb, an uneven 20 x 17 grid (border windows on every side).
  """
  gen = torch.Generator().manual_seed(seed)
  kw = dict(kernel_size=(7, 7), stride=(1, 2), dilation=(2, 1), is_causal=(False, True),
            scale=0.3)
  shape = (2, 20, 17, 2, 32)
  inputs = [torch.randn(shape, generator=gen) for _ in range(3)]
  inputs.append(torch.randn((2, 13, 13), generator=gen))
  if attend is natten_neighbourhood_attention:
    inputs[3] = None
  results = []
  for fn in (attend, torch_nat.neighbourhood_attention):
    args = [None if t is None else t.to(device).requires_grad_() for t in inputs]
    out = fn(*args[:3], rpb=args[3], **kw)
    cotangent = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad(out, [a for a in args if a is not None], cotangent.to(device))
    results.append([out, *grads])
  names = ["out", "dq", "dk", "dv", "drpb"]
  return {name: float((a - b).abs().max()) for name, a, b in zip(names, *results)}


def choose_attention(requested, device, compile_mode, run_check):
  """``(attention, its device check or None, {attention passed over: why})``.

  With ``auto``, an attention whose device check raises (a torch or GPU without some
  feature it needs) gives way to the next one, and the reason is reported; a named
  attention that fails raises.
  """
  usable = available_attentions(device)
  if requested != "auto" and requested not in usable:
    raise ValueError(f"attention={requested!r} cannot train on {device.type} here: "
                     f"this torch {torch.__version__} offers {usable}")
  passed_over = {}
  for name in usable if requested == "auto" else [requested]:
    if not run_check or name == "gather":
      return name, None, passed_over
    # Compiled as the model will run it, so the check covers the kernels that are timed.
    attend = attention_fn(name, "none" if compile_mode == "none" else "attention")
    try:
      check = check_attention(attend, device)
      log(f"{name} attention checked against the gather reference: {check}")
      return name, check, passed_over
    except Exception as e:  # pylint: disable=broad-except  (reported, next attention tried)
      if requested != "auto":
        raise
      passed_over[name] = f"{type(e).__name__}: {e}"[:500]
      log(f"{name} attention passed over: {passed_over[name]}")
  raise AssertionError("unreachable: gather, last in line, is never checked")


def bench(args):
  device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
  compile_mode = args.compile or ("blocks" if device.type == "cuda" else "none")
  attention, check, passed_over = choose_attention(args.attention, device, compile_mode,
                                                   args.check)
  dtype = DTYPES[args.dtype]
  torch.manual_seed(0)
  net = build_model(args.model, attention, compile_mode).to(device)

  images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
  labels = torch.randint(0, 1000, (args.batch,), device=device)
  if compile_mode == "blocks":
    with torch.no_grad():  # an eager pass builds every level's block mask outside compiled code
      net(images[:1])
    compile_blocks(net)

  no_decay = lambda name, p: p.ndim <= 1 or name.endswith("rpb")
  params = list(net.named_parameters())
  groups = [{"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": 0.05},
            {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          fused=device.type == "cuda")
  autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def step():
    with autocast:
      logits = net(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    opt.step()
    return loss

  times, losses = [], []
  for _ in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    losses.append(step().detach())
    sync()
    times.append(time.perf_counter() - t0)
    if len(times) <= args.warmup:
      log(f"warm-up step {len(times)}: {times[-1]:.2f} s")
  timed = np.array(times[args.warmup:])
  result = {
      "framework": f"torch {torch.__version__}",
      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
      "model": args.model,
      "batch": args.batch,
      "image_size": args.image_size,
      "dtype": args.dtype,
      "attention": attention if attention != "natten" else f"natten {natten.__version__} (no rpb)",
      "compile": compile_mode,
      "steps": args.steps,
      "warmup_steps": args.warmup,
      "images_per_s": args.batch / float(np.median(timed)),
      "step_time_s": float(np.median(timed)),
      "step_time_mean_s": float(timed.mean()),
      "warmup_s": float(sum(times[:args.warmup])),
      "loss_first": float(losses[0]),
      "loss_last": float(losses[-1]),
      "attention_check_max_abs_err": check,
      "attentions_passed_over": passed_over,
  }
  if device.type == "cuda":
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
  return result


CHECK_TOLERANCE = 1e-3  # float32 on the device; a wrong window or bias is off by O(1)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--model", default="nat_tiny", help="a jnat.models.VARIANTS name")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                 help="autocast compute dtype; parameters stay float32")
  p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
  p.add_argument("--attention", choices=("auto", "flex", "natten", "gather"), default="auto")
  p.add_argument("--compile", choices=COMPILE_MODES, default=None,
                 help="blocks: each transformer block (default on CUDA); attention: "
                      "flex_attention only; none (default on CPU)")
  p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
  p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                 help="check the attention against the gather reference on the device first")
  p.add_argument("--out", default=None, help="write the JSON result here too")
  args = p.parse_args(argv)
  for name in ("batch", "image_size", "steps"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  if args.warmup < 0:
    raise ValueError(f"--warmup={args.warmup} must be >= 0")

  result = bench(args)
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(line + "\n")
  check = result["attention_check_max_abs_err"]
  if check and max(check.values()) > CHECK_TOLERANCE:
    print(f"attention check failed: max |error| {check} > {CHECK_TOLERANCE}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
