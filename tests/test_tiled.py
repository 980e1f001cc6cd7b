"""The "tiled" backend: NATTEN's semantics, the xla reference's numbers, portability, memory.

* Its tile tables (the only part that depends on the neighbourhood) encode exactly the
  reference's windows, on thousands of random configurations (NumPy only, no compiling).
* Forward, lse and every gradient match the xla reference on random configurations: at least
  JNAT_PROPERTY_EXAMPLES (default 200) random inputs over the shared pool of shape buckets
  (tests/na_testing.py, every feature of the op), so that each bucket compiles once; NATTEN's
  golden data is checked for every backend in tests/test_ops_golden.py.
* float64 gradients against finite differences; jit/grad/vmap/remat.
* It lowers for TPU and CUDA from this machine with no custom call, and its compiled
  forward+backward needs at least 4x less temporary memory than the xla reference's.
"""


import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from jnat import _checks, reference, tiled
from na_testing import (BUCKETS, bucket_config, check_fused_against_reference, nbhd_args, op,
                        random_inputs, rel_err)
from na_testing import EXAMPLES, MASKS, SEEDS, SETTINGS, per_bucket


# --- The tile tables against the reference's windows. ---

@st.composite
def axes(draw, kernels=12, dilations=4, extra=40, tiles=(1, 20)):
  kernel = draw(st.integers(2, kernels))
  dilation = draw(st.integers(1, dilations))
  return dict(length=kernel * dilation + draw(st.integers(0, extra)), kernel=kernel,
              stride=draw(st.integers(1, kernel)), dilation=dilation, causal=draw(st.booleans()),
              tile=draw(st.integers(*tiles)))


def _windows_from_tiles(t: tiled.AxisTiling, kernel):
  """{query position: sorted (key position, rpb index) pairs} read back from the tables."""
  found = {}
  for unit, slot, w in zip(*np.nonzero(t.mask)):
    group, in_group = unit // t.tiles, (unit % t.tiles) * t.tile + slot
    query = in_group * t.dilation + group
    if in_group >= t.group_length or query >= t.length:
      continue  # padding: its output is dropped
    key_in_group = (unit % t.tiles) * t.tile + t.halo_offset + w
    rpb = int(t.rpb_index[unit, slot, w])
    assert 0 <= rpb < 2 * kernel - 1
    found.setdefault(int(query), []).append((int(key_in_group * t.dilation + group), rpb))
  return {q: sorted(v) for q, v in found.items()}


@settings(SETTINGS, max_examples=2000)
@given(a=axes())
def test_tables_encode_exactly_the_reference_windows(a):
  nbhd = _checks.Neighborhood((a["kernel"],), (a["stride"],), (a["dilation"],), (a["causal"],))
  (t,) = tiled.tiling((a["length"],), nbhd, (a["tile"],))
  keys, valid, rpb_index = reference.axis_windows(a["length"], a["kernel"], a["stride"],
                                                  a["dilation"], a["causal"])
  expected = {i: sorted(zip(keys[i][valid[i]].tolist(), rpb_index[i][valid[i]].tolist()))
              for i in range(a["length"])}
  assert _windows_from_tiles(t, a["kernel"]) == expected
  assert np.array_equal(t.rpb_index >= 0, t.mask)  # an rpb entry exactly where visible
  assert t.tile % a["stride"] == 0 or t.tile == t.group_length  # tiles hold whole stride groups
  # Blocks stay local: the tile plus about one window (plus border shifts), whatever the length.
  assert t.halo <= t.tile + 2 * a["kernel"]


def _visible_pairs(mask, rpb_index, q_index, k_index):
  """{(unit, query token, key token, rpb entry)} of tables split into ``parts`` (mask ``[U,
  1, parts, T / parts, W']``, rpb_index ``[U, parts, T / parts, W']``, k_index ``[U, parts *
  W']``)."""
  units, _, parts, per_part, width = mask.shape
  u, j, t, w = np.nonzero(mask[:, 0])
  return set(zip(u.tolist(), q_index[u, j * per_part + t].tolist(),
                 k_index[u, j * width + w].tolist(), rpb_index[u, j, t, w].tolist()))


@settings(SETTINGS, max_examples=300)
@given(per_axis=st.lists(axes(kernels=7, dilations=2, extra=12, tiles=(2, 8)), min_size=1,
                         max_size=2))
def test_split_tables_see_exactly_the_same_keys(per_axis):
  """A tile split in two along its first axis, each half over its own run of the block's
  keys, sees exactly the (query, key, rpb entry) pairs the whole tile does."""
  nbhd = _checks.Neighborhood(*(tuple(a[f] for a in per_axis)
                                for f in ("kernel", "stride", "dilation", "causal")))
  tilings = tiled.tiling(tuple(a["length"] for a in per_axis), nbhd,
                         tuple(a["tile"] for a in per_axis))
  tables = (tiled.tile_mask(tilings), tiled.tile_rpb_index(tilings, (1,) + tuple(
      2 * a["kernel"] - 1 for a in per_axis)), tiled.query_token_index(tilings),
      tiled.key_token_index(tilings))
  split = tiled.key_split(tables[0][:, 0], tilings, most=1.0)
  if split is None:  # the tile's first axis is odd
    assert tilings[0].tile % 2
    return
  whole = (tables[0][:, :, None], tables[1][:, None], tables[2], tables[3])
  assert _visible_pairs(*split.cut_tables(tables)) == _visible_pairs(*whole)


# --- Numbers: the xla reference on the shared pool of random shape buckets. ---
# (NATTEN's golden data: tests/test_ops_golden.py runs every backend, this one included.)

@pytest.mark.parametrize("bucket", range(len(BUCKETS)))
@settings(SETTINGS, max_examples=per_bucket(EXAMPLES))
@given(seed=SEEDS, mask=MASKS)
def test_matches_reference(bucket, seed, mask):
  check_fused_against_reference(bucket_config(bucket, seed, mask), "tiled")


def test_fully_masked_window_gives_zero_and_minus_inf():
  """An rpb of -inf everywhere masks every slot: output 0, lse -inf, zero gradients."""
  q, k, v, _, _, _ = random_inputs(0, 1, (9,), 2, 1, 4)
  rpb = jnp.full((2, 5), -jnp.inf)
  f = lambda q, k, v: op(1)(q, k, v, 3, rpb=rpb, return_lse=True, backend="tiled")
  out, lse = jax.jit(f)(q, k, v)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(lse))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0]), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.all(np.asarray(g) == 0) for g in grads)


# --- float64 gradients against finite differences. ---

MIXED = [
    dict(rank=1, spatial=(11,), kernel_size=(4,), stride=(3,), dilation=(2,), is_causal=(True,),
         heads=2, kv_heads=1),
    dict(rank=2, spatial=(6, 7), kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2),
         is_causal=(False, True), heads=2, kv_heads=2),
    dict(rank=3, spatial=(4, 3, 5), kernel_size=(2, 3, 2), stride=(1, 1, 2), dilation=(2, 1, 1),
         is_causal=(True, False, False), heads=2, kv_heads=1),
]


# Configurations whose unit count chunks of (at most) 3 units do not divide.
PADDED = [
    dict(rank=1, spatial=(13,), kernel_size=(3,), stride=(1,), dilation=(1,), is_causal=(False,),
         heads=2, kv_heads=1),  # 7 units: 3 chunks of 3
    dict(rank=2, spatial=(7, 7), kernel_size=(3, 2), stride=(1, 1), dilation=(1, 2),
         is_causal=(False, True), heads=2, kv_heads=2),  # 16 units: 6 chunks of 3
]


# Configurations with tiles deep enough along their first axis that each half of a tile
# runs over its own part of the block's keys (``tiled.KeySplit``; 1D and 2D only).
SPLIT = [
    dict(rank=1, spatial=(40,), kernel_size=(7,), stride=(1,), dilation=(2,), is_causal=(False,),
         heads=2, kv_heads=1, tile=(8,)),
    dict(rank=2, spatial=(19, 11), kernel_size=(5, 3), stride=(1, 2), dilation=(1, 1),
         is_causal=(False, True), heads=2, kv_heads=2, tile=(8, 4)),
]


@pytest.mark.parametrize("c, per_chunk", [(c, 1) for c in MIXED] + [(c, 3) for c in PADDED] +
                         [(c, 1) for c in SPLIT],
                         ids=["1d", "2d", "3d", "1d-padded", "2d-padded", "1d-split", "2d-split"])
def test_small_chunks_match_reference(c, per_chunk, monkeypatch):
  """The CPU loop with small tiles, one per chunk or a few (the last chunk filled up with
  empty units), so that many chunks gather overlapping key blocks and add their key
  gradients into the loop's carry (the random buckets mostly fit in one chunk); inference in
  steps of two chunks where a chunk holds fewer query rows than ``FUSED_ROWS``, padded
  further where their number is odd (1d-padded: 12 units against 9, 2d-split: 10 against
  9); and tiles split over their keys, in exactly the configurations meant to be."""
  batch = 3  # odd: the rpb gradient halves the batch unevenly
  tile = c.get("tile", (2,) * c["rank"])
  monkeypatch.setitem(tiled.TILE, c["rank"], tile)
  nbhd = _checks.Neighborhood(*nbhd_args(c).values())
  tilings = tiled.tiling(c["spatial"], nbhd, tile)
  if "tile" in c:
    assert tiled.key_split(tiled.tile_mask(tilings)[:, 0], tilings) is not None
  dim = 8
  per_unit = tiled.unit_elements(tilings, batch, c["heads"], dim)
  for plan in ("cpu", "cpu, one thread"):
    monkeypatch.setitem(tiled.CHUNK_ELEMENTS, plan, int(per_chunk * per_unit["cpu"]))
  # Inference in steps of (at most) two training chunks, which an odd number does not divide.
  monkeypatch.setattr(tiled, "FUSED_ROWS", per_chunk * batch * c["heads"] * math.prod(tile) + 1)
  q, k, v, rpb, _, _ = random_inputs(4, batch, c["spatial"], c["heads"], c["kv_heads"], dim,
                                     rpb_shape=tuple(2 * k - 1 for k in c["kernel_size"]))

  def outputs_and_grads(backend):
    def loss(q, k, v, rpb):
      out, lse = op(c["rank"])(q, k, v, rpb=rpb, return_lse=True, backend=backend,
                               **nbhd_args(c))
      return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(lse)), (out, lse)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    if backend == "tiled":
      assert "stablehlo.while" in fn.lower(q, k, v, rpb).as_text()
    grads, (out, lse) = fn(q, k, v, rpb)
    # Without gradients the forward takes its own path (on CPU the fused one, in groups of
    # chunks): its results too.
    inference = jax.jit(lambda q, k, v, rpb: op(c["rank"])(
        q, k, v, rpb=rpb, return_lse=True, backend=backend, **nbhd_args(c)))(q, k, v, rpb)
    return (out, lse, *grads, *inference)

  for got, want in zip(outputs_and_grads("tiled"), outputs_and_grads("xla"), strict=True):
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("c", MIXED, ids=["1d", "2d", "3d"])
def test_gradients_float64(c):
  with jax.enable_x64(True):
    q, k, v, rpb, _, _ = random_inputs(3, 1, c["spatial"], c["heads"], c["kv_heads"], 4,
                                       jnp.float64, tuple(2 * k - 1 for k in c["kernel_size"]))
    f = jax.jit(lambda q, k, v, rpb: op(c["rank"])(q, k, v, rpb=rpb, return_lse=True,
                                                   backend="tiled", **nbhd_args(c)))
    check_grads(f, (q, k, v, rpb.astype(jnp.float64)), order=1, modes=("rev",), eps=1e-6,
                atol=1e-6, rtol=1e-6)


# --- Transformations. ---

SMALL = dict(kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))


def _small_inputs():
  q, k, v, rpb, _, _ = random_inputs(5, 2, (7, 9), 4, 2, 8, rpb_shape=(5, 7))
  return q, k, v, rpb


def _small_loss(backend):
  return lambda q, k, v, rpb: jnp.sum(jnp.sin(op(2)(q, k, v, rpb=rpb, backend=backend, **SMALL)))


def test_vmap_matches_per_example():
  q, k, v, rpb = _small_inputs()
  f = lambda q, k, v: op(2)(q[None], k[None], v[None], rpb=rpb, backend="tiled", **SMALL)[0]
  batched = jax.jit(jax.vmap(f))(q, k, v)
  expected = jax.jit(lambda q, k, v: op(2)(q, k, v, rpb=rpb, backend="xla", **SMALL))(q, k, v)
  np.testing.assert_allclose(batched, expected, atol=2e-5, rtol=0)


def test_remat_and_jit_grad_match_reference():
  args = _small_inputs()
  grads = jax.jit(jax.grad(jax.checkpoint(_small_loss("tiled")), argnums=(0, 1, 2, 3)))(*args)
  ref = jax.jit(jax.grad(_small_loss("xla"), argnums=(0, 1, 2, 3)))(*args)
  for g, r in zip(grads, ref):
    assert rel_err(g, r) <= 1e-5


# --- Portability and memory. ---

def _case_a(dtype=jnp.float32, rpb=False):
  x = jax.ShapeDtypeStruct((2, 56, 56, 4, 32), dtype)
  return (x, x, x) + ((jax.ShapeDtypeStruct((4, 13, 13), jnp.float32),) if rpb else ())


def _forward(backend):
  return lambda q, k, v, *rpb: op(2)(q, k, v, 7, rpb=rpb[0] if rpb else None, backend=backend)


def _gradient(backend):
  loss = lambda *a: jnp.sum(_forward(backend)(*a).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2, 3))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("kind", ["forward", "gradient"])
def test_lowers_for_accelerators_without_custom_calls(platform, kind):
  fn = (_forward if kind == "forward" else _gradient)("tiled")
  lowered = jax.jit(fn).trace(*_case_a(jnp.bfloat16, rpb=True)).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  assert "stablehlo.dot_general" in text
  assert "custom_call" not in text


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_units_chunked_for_cache_on_cpu_only(platform):
  """On CPU the tiles run in cache-sized chunks (a loop); on an accelerator each loop
  iteration would be many small kernels, so the same problem runs as one batch there."""
  text = jax.jit(_gradient("tiled")).trace(*_case_a(jnp.bfloat16, rpb=True)).lower(
      lowering_platforms=(platform,)).as_text()
  assert ("stablehlo.while" in text) == (platform == "cpu")


def test_cpu_inference_runs_both_products_in_one_library_fusion():
  """Without gradients, XLA's CPU backend runs the tiles' logits product, softmax and output
  product as one YNNPACK fusion, on all its threads: a change that splits them (a select
  between the product and the maximum, a small op between them) falls back to one thread
  per matmul, 1.3-1.6x slower on two cores."""
  text = jax.jit(_forward("tiled")).lower(*_case_a()).compile().as_text()
  fused = [body for body in text.split("\n\n") if body.count(" dot(") == 2]
  assert len(fused) == 1 and " exponential(" in fused[0] and " reduce(" in fused[0]
  assert "__ynn_fusion" in text


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_training_products_each_fused_with_a_reduction(threads, monkeypatch):
  """With several CPU threads each of the training path's seven tile products (two forward,
  five backward) is one YNNPACK fusion with a reduction of its result, the form XLA's CPU
  backend runs on all threads (1.6-2.2x faster per product on two cores); a plain product
  runs on one. With one thread the products stay plain."""
  monkeypatch.setattr(tiled, "usable_cores", lambda: threads)
  text = jax.jit(_gradient("tiled")).lower(*_case_a(rpb=True)).compile().as_text()
  products = [body for body in text.split("\n\n") if " dot(" in body]
  threaded = [body for body in products if " reduce(" in body and " minimum(" in body]
  assert len(threaded) == (7 if threads > 1 else 0), len(threaded)
  assert "__ynn_fusion" in text


@pytest.mark.parametrize("threads", [1, 2])
def test_wide_kernels_take_tall_tiles_on_threads(threads, monkeypatch):
  """In 2D with a kernel of 11 or more along the first axis and several CPU threads the tiles
  are 16 x 8 (``tiled.default_tile``), split over their keys; with one thread 8 x 8. Results
  and gradients match the reference either way, in the chunk loop (one unit per chunk)."""
  monkeypatch.setattr(tiled, "usable_cores", lambda: threads)
  for plan in ("cpu", "cpu, one thread"):
    monkeypatch.setitem(tiled.CHUNK_ELEMENTS, plan, 1)
  used, tiling = [], tiled.tiling
  monkeypatch.setattr(tiled, "tiling", lambda spatial, nbhd, tile: used.append(tile) or
                      tiling(spatial, nbhd, tile))
  tall = tiling((34, 30), _checks.Neighborhood((11, 7), (1, 1), (1, 2), (False, False)), (16, 8))
  assert tiled.key_split(tiled.tile_mask(tall)[:, 0], tall) is not None
  q, k, v, rpb, _, _ = random_inputs(5, 2, (34, 30), 2, 1, 8, rpb_shape=(21, 13))
  na = lambda backend, q, k, v, rpb: op(2)(q, k, v, (11, 7), dilation=(1, 2), rpb=rpb,
                                           backend=backend)

  def outputs_and_grads(backend):
    loss = lambda *a: jnp.sum(jnp.sin(na(backend, *a)))
    return (na(backend, q, k, v, rpb), *jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, rpb))

  for got, want in zip(outputs_and_grads("tiled"), outputs_and_grads("xla"), strict=True):
    assert rel_err(got, want) <= 1e-5
  assert ((16, 8) in used) == (threads > 1), used  # accelerators' plans take (8, 8)


def test_float32_products_at_full_precision_on_gpu():
  """GPUs run float32 matmuls as TF32 by default (~1e-3): the tiled products must not."""
  text = jax.jit(_gradient("tiled")).trace(*_case_a(jnp.float32, rpb=True)).lower(
      lowering_platforms=("cuda",)).as_text()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert dots and all("precision = [HIGHEST, HIGHEST]" in line for line in dots)


def test_temporary_memory_at_least_4x_below_xla():
  """Case (a) of the benchmark, forward+backward, from the compiled CPU programs."""
  def temp_bytes(backend):
    grad = jax.grad(lambda *a: jnp.sum(_forward(backend)(*a)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(*_case_a()).compile().memory_analysis().temp_size_in_bytes
  assert 4 * temp_bytes("tiled") <= temp_bytes("xla")
