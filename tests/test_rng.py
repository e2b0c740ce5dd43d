"""LoRI-RNG v1 in torch, bit for bit against the golden file of docs/RNG_SPEC.md."""

import filecmp
import struct
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise_equal

import lori_kernels
from lori_kernels import rng

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


def f32_hex(t: torch.Tensor) -> list:
    return [[format(struct.unpack("<I", struct.pack("<f", float(v)))[0], "08x") for v in row] for row in t]


@pytest.mark.parametrize(
    "ours, theirs",
    [(DATA / "rng_golden_v1.json", "rng_golden_v1.json"), (REPO / "docs" / "RNG_SPEC.md", "RNG_SPEC.md")],
)
def test_copies_match_shared(ours, theirs):
    """tests/data and docs/ hold copies of shared/; where shared/ is present they must match."""
    if not (SHARED / theirs).exists():
        pytest.skip("shared/ is not beside this checkout")
    assert filecmp.cmp(ours, SHARED / theirs, shallow=False), f"{ours} differs from shared/{theirs}"


def test_philox_known_answers(golden):
    for case in golden["philox4x32_10_kat"]:
        ctr = [torch.tensor([v]) for v in case["ctr"]]
        out = [int(t) for t in rng.philox4x32_10(*ctr, *case["key"])]
        assert out == case["out"]


def test_splitmix64_fnv1a64_layer_seed(golden):
    for case in golden["splitmix64"]:
        assert rng.splitmix64(case["in"]) == case["out"]
    for case in golden["fnv1a64"]:
        assert rng.fnv1a64(case["in"]) == case["out"]
    for case in golden["layer_seed"]:
        assert rng.layer_seed(case["global_seed"], case["name"]) == case["out"]
        assert lori_kernels.layer_seed(case["global_seed"], "base_model.model." + case["name"]) == case["out"]


def test_dropout_seed():
    """A forward's dropout seed: splitmix64(layer_seed ^ splitmix64(step + (rank << 40))),
    pinned by values (masks of existing checkpoints' runs depend on it); the tensor form
    (a custom op, for torch.compile) gives the same value."""
    assert rng.dropout_seed(2**64 - 5, 1) == 14904313947699082216
    assert rng.dropout_seed(2**64 - 5, 12345, 7) == 1955254212765586627
    assert rng.dropout_seed(rng.to_int64(2**64 - 5), 12345, 7) == 1955254212765586627
    assert rng.dropout_seed(9, 3, 2) == rng.splitmix64(9 ^ rng.splitmix64(3 + (2 << 40)))
    step = torch.tensor(12345)
    seed = rng.dropout_seed_tensor(2**64 - 5, step, 7)
    assert seed.dtype == torch.int64 and seed.shape == () and seed.device.type == "cpu"
    assert rng.to_uint64(seed) == 1955254212765586627
    torch.library.opcheck(torch.ops.lori_rng.dropout_seed, (step, rng.to_int64(2**64 - 5), 7))


@pytest.mark.parametrize("seed", [5, 2**63 + 11])
def test_seed_tensors_give_the_words_of_their_value(seed):
    """A seed tensor is never read (torch.compile traces the words from it, fullgraph) and
    gives the words of the seed's value, also at 2^63 and above (two's complement)."""
    seed_t = torch.tensor(rng.to_int64(seed))

    def mask(s):
        return rng.dropout_keep(s, 0.3, 5, 9, row0=3)

    want = mask(seed)
    assert torch.equal(mask(seed_t), want)
    assert torch.equal(mask(seed_t.reshape(1)), want)
    assert torch.equal(torch.compile(mask, backend="aot_eager", fullgraph=True)(seed_t), want)
    assert_bitwise_equal(rng.generate_a_tile(seed_t, 13, 0, 4, 0, 13), rng.generate_a_tile(seed, 13, 0, 4, 0, 13))


def test_random_words(golden):
    """Single words, including flat indices past 2^32 and 2^63 (carried into c1)."""
    for case in golden["bits"]:
        word = rng.random_words(case["seed"], case["stream"], 1, case["i"], 1, 0, 1)
        assert int(word) == case["out"], case


def test_random_words_tiles_agree_with_whole_matrix():
    """Any tiling gives the word of the same flat index, whatever its alignment to 4."""
    whole = rng.random_words(99, 0, 13, 0, 7, 0, 13)
    for row0, rows, col0, cols in [(0, 7, 0, 13), (1, 3, 2, 5), (6, 1, 12, 1), (2, 4, 3, 0)]:
        tile = rng.random_words(99, 0, 13, row0, rows, col0, cols)
        assert torch.equal(tile, whole[row0 : row0 + rows, col0 : col0 + cols])
    flat = rng.random_words(99, 0, 1, 0, 91, 0, 1).reshape(7, 13)
    assert torch.equal(flat, whole)


@pytest.mark.parametrize("key", ["a_uniform", "a_rademacher"])
def test_generate_a_golden(golden, key):
    case = golden[key]
    a = lori_kernels.generate_a(case["seed"], case["r"], case["d_in"], dist=case["dist"], backend="reference")
    assert a.dtype == torch.float32
    assert f32_hex(a) == case["float32_hex"]


def test_generate_a_seed_forms_agree():
    """uint64, its two's-complement int64 and an int64 tensor name the same seed."""
    seed = 2**64 - 12345
    a = lori_kernels.generate_a(seed, 3, 17, backend="reference")
    assert_bitwise_equal(a, lori_kernels.generate_a(seed - 2**64, 3, 17, backend="reference"))
    assert_bitwise_equal(a, lori_kernels.generate_a(torch.tensor(seed - 2**64), 3, 17, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_generate_a_dtype_is_rounded_float32(dtype):
    a32 = lori_kernels.generate_a(7, 4, 33, backend="reference")
    assert_bitwise_equal(lori_kernels.generate_a(7, 4, 33, dtype=dtype, backend="reference"), a32.to(dtype))


def test_generate_a_distribution():
    """Uniform in [-bound, bound) with the kaiming bound; rademacher exactly +-bound."""
    d_in = 1000
    bound = rng.a_bound(d_in)
    assert bound == float(torch.tensor(1 / d_in**0.5, dtype=torch.float32))
    a = lori_kernels.generate_a(1, 64, d_in, backend="reference")
    assert a.abs().max() <= bound
    assert abs(a.mean()) < 0.01 * bound and abs(a.std() - bound / 3**0.5) < 0.01 * bound
    s = lori_kernels.generate_a(1, 64, d_in, dist="rademacher", backend="reference")
    assert set(s.unique().tolist()) == {-bound, bound}
    assert abs((s > 0).float().mean() - 0.5) < 0.01


def test_generate_a_rows_are_prefixes():
    """A of rank r is the first r rows of A of a larger rank: rows depend only on j, k."""
    big = lori_kernels.generate_a(3, 16, 50, backend="reference")
    assert_bitwise_equal(lori_kernels.generate_a(3, 5, 50, backend="reference"), big[:5])


def test_dropout_golden(golden):
    for case in golden["dropout"]:
        keep = rng.dropout_keep(case["dropout_seed"], case["p"], case["M"], case["d_in"])
        assert keep.to(torch.int64).tolist() == case["keep"], case["p"]
        scale = rng.dropout_scale(case["p"])
        assert format(struct.unpack("<I", struct.pack("<f", scale))[0], "08x") == case["scale_float32_hex"]


def test_dropout_rows_offset_and_rate():
    keep = rng.dropout_keep(5, 0.25, 40, 31)
    assert torch.equal(rng.dropout_keep(5, 0.25, 3, 31, row0=10), keep[10:13])
    assert abs(keep.float().mean() - 0.75) < 0.03
    assert rng.dropout_keep(5, 0.0, 4, 9).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rng.to_uint64(2**64), "outside"),
        (lambda: rng.to_uint64(-(2**63) - 1), "outside"),
        (lambda: rng.to_uint64(1.5), "seed must be an int"),
        (lambda: rng.to_uint64(torch.tensor([1, 2])), "one int64 value"),
        (lambda: rng.to_uint64(torch.tensor(1.0)), "one int64 value"),
        (lambda: rng.dropout_keep(1, 1.0, 2, 2), r"\[0, 1\)"),
        (lambda: rng.dropout_keep(1, -0.1, 2, 2), r"\[0, 1\)"),
        (lambda: rng.random_words(1, 0, 4, 0, 1, 2, 3), "does not fit"),
        (lambda: rng.dropout_keep(torch.tensor([1, 2]), 0.5, 2, 2), "one int64 value"),
        (lambda: lori_kernels.generate_a(1, 2, 0), "d_in > 0"),
        (lambda: lori_kernels.generate_a(1, 2, 3, dist="normal"), "dist must be one of"),
        (lambda: lori_kernels.generate_a(1, 2, 3, backend="fast"), "unknown backend"),
    ],
)
def test_rng_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
