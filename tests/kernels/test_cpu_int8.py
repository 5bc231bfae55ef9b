"""The native int8 kernel (kernels/cpu) against its torch reference (``reference.int8_linear``: exact int32 products),
per-token activation scales, Int8Linear on it against fbgemm, and the fbgemm fallback."""

from __future__ import annotations

import pytest
import torch

from omnistream.kernels import cpu as native
from omnistream.kernels import reference as ref
from omnistream.reasoning.llm.int8 import WEIGHT_MAX, Int8Linear

needs_native = pytest.mark.skipif(
    not native.available(), reason="native int8 kernel unavailable (no compiler or no AVX2)"
)


def random_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-WEIGHT_MAX, WEIGHT_MAX + 1, (n, k), dtype=torch.int8, generator=g)
    qweight[0, : min(k, 5)] = WEIGHT_MAX  # extremes: the pair sums' worst case
    return qweight, torch.rand(n, generator=g) * 0.02 + 1e-3


@needs_native
def test_activation_quantization_is_per_row_asymmetric_round_half_even() -> None:
    x = torch.randn(6, 77) * torch.tensor([1.0, 1000.0, 1e-3, 0.0, 3.0, 1.0])[:, None]
    x[4, :4] = torch.tensor([255.0, 0.5, 1.5, 2.5])  # row 4: range [0, 255], scale 1, ties
    x[4, 4:] = x[4, 4:].abs()
    x[5] = x[5].abs() + 1  # all positive: the range still starts at 0
    q, scales, zeros = native.quantize_rows(x)
    u, x_scale, zero = ref.int8_quantize_rows(x)
    torch.testing.assert_close(scales, x_scale, rtol=0, atol=0)
    assert torch.equal(zeros, zero.to(torch.int32)) and torch.equal(q.to(torch.int32), u.to(torch.int32))
    assert torch.equal(q[3], torch.zeros(77, dtype=torch.uint8)) and int(zeros[3]) == 0  # an all-zero row
    assert q[4, :4].tolist() == [255, 0, 2, 2] and int(zeros[4]) == 0
    assert int(zeros[5]) == 0 and int(q[5].max()) == 255
    # Asymmetric: a one-sided outlier keeps all 256 levels for the row's real range.
    spread = x[0].max() - x[0].min()
    assert float(scales[0]) <= float(spread) / 255 * 1.0001


@needs_native
@pytest.mark.parametrize("m", [1, 3, 17, 64, 300])
@pytest.mark.parametrize("k", [32, 100, 896])
@pytest.mark.parametrize("n", [1, 7, 130])
def test_kernel_matches_the_exact_reference(m: int, k: int, n: int) -> None:
    qweight, scales = random_weight(n, k, seed=m * 1000 + k + n)
    rowsum = native.weight_rowsum(qweight)
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 10 + 0.01)
    bias = torch.randn(n, generator=g)
    for b in (None, bias):
        expected = ref.int8_linear(x, qweight, scales, b)
        for threads in (1, 2):
            got = native.int8_linear(x, qweight, scales, rowsum, b, threads=threads)
            assert got.shape == (m, n) and got.dtype == torch.float32
            torch.testing.assert_close(
                got, expected, rtol=2e-6, atol=2e-6 * float(expected.abs().max()) + 1e-6
            )


@needs_native
def test_kernel_handles_leading_dimensions_dtypes_and_a_large_shape() -> None:
    qweight, scales = random_weight(301, 1000, seed=3)
    rowsum = native.weight_rowsum(qweight)
    x = torch.randn(2, 37, 1000)
    expected = ref.int8_linear(x.reshape(-1, 1000), qweight, scales, None).reshape(2, 37, 301)
    torch.testing.assert_close(native.int8_linear(x, qweight, scales, rowsum), expected, rtol=2e-6, atol=1e-4)
    got = native.int8_linear(x.transpose(0, 1).contiguous().transpose(0, 1), qweight, scales, rowsum)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-4)  # a non-contiguous input
    half = native.int8_linear(x.bfloat16(), qweight, scales, rowsum)
    torch.testing.assert_close(
        half,
        ref.int8_linear(x.bfloat16().float().reshape(-1, 1000), qweight, scales, None).reshape(2, 37, 301),
        rtol=2e-6,
        atol=1e-4,
    )


@needs_native
def test_an_outlier_token_does_not_change_the_other_rows_outputs() -> None:
    qweight, scales = random_weight(50, 96, seed=7)
    rowsum = native.weight_rowsum(qweight)
    rows = torch.randn(9, 96)
    alone = native.int8_linear(rows, qweight, scales, rowsum, threads=2)
    together = native.int8_linear(
        torch.cat([torch.randn(1, 96) * 1e4, rows]), qweight, scales, rowsum, threads=2
    )
    assert torch.equal(together[1:], alone)  # bit for bit, whichever tile a row fell in
    one_by_one = torch.cat(
        [native.int8_linear(row[None], qweight, scales, rowsum, threads=1) for row in rows]
    )
    assert torch.equal(one_by_one, alone)


@needs_native
def test_int8_linear_runs_native_on_its_stored_weights() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    fast = Int8Linear.from_linear(linear)
    qweight, scales, bias = fast.unpacked()
    assert qweight.dtype == torch.int8 and torch.equal(bias, linear.bias.data)
    x = torch.randn(2, 11, 256)
    with torch.inference_mode():
        got, exact = fast(x), linear(x)
    assert got.shape == exact.shape
    torch.testing.assert_close(
        got.reshape(22, 96), ref.int8_linear(x.reshape(22, 256), qweight, scales, bias)
    )
    assert (got - exact).norm() / exact.norm() < 0.02


def test_without_the_native_kernel_int8_is_refused_and_auto_runs_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from omnistream.reasoning.llm.formats import resolve_format

    monkeypatch.setenv("OMNISTREAM_NATIVE", "0")
    assert not native.available()
    with pytest.raises(RuntimeError, match="native CPU kernels"):
        Int8Linear.from_linear(torch.nn.Linear(64, 48))
    if not torch.cuda.is_available():
        assert resolve_format("auto") == "float32"


def test_a_failed_build_reports_unavailable_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "int8_gemm.c").write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path)
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    if not native._cpu_supported() or native._compiler() is None:
        pytest.skip("no AVX2 CPU or no compiler: the build is never tried")
    with caplog.at_level("WARNING", logger="omnistream.kernels.cpu"):
        assert not native.available()
        assert not native.available()  # tried once per process
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert not list((tmp_path / "cache").glob("*.so"))


def test_the_library_is_built_once_into_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    if not native._cpu_supported() or native._compiler() is None:
        pytest.skip("no AVX2 CPU or no compiler")
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    path = native.build()
    assert path is not None and path.parent == tmp_path and path.exists()
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert [p.name for p in tmp_path.glob("*.so")] == [path.name]  # no temporary left behind


@needs_native
def test_concurrent_callers_share_the_helper_pool_safely() -> None:
    from concurrent.futures import ThreadPoolExecutor

    qweight, scales = random_weight(200, 384, seed=11)
    rowsum = native.weight_rowsum(qweight)
    inputs = [torch.randn(m, 384) for m in (1, 2, 5, 33) * 4]
    expected = [native.int8_linear(x, qweight, scales, rowsum, threads=1) for x in inputs]

    def work(i: int) -> bool:
        return all(
            torch.equal(native.int8_linear(inputs[i], qweight, scales, rowsum, threads=2), expected[i])
            for _ in range(20)
        )

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(len(inputs))))
