"""mpo.adapt.analyze: per-matrix MPO errors, parameters and spectra of a model's targets."""

from __future__ import annotations

import copy
import csv
import itertools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import TINY_LLAMA  # noqa: E402

transformers = pytest.importorskip("transformers")

import mpo  # noqa: E402
import mpo.adapt  # noqa: E402
from mpo.adapt import Analysis, DoTAConfig, analyze, plan  # noqa: E402
from mpo.errors import MPOError  # noqa: E402

RANKS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()


@pytest.fixture(scope="module")
def result(llama) -> Analysis:
    return analyze(llama, ranks=RANKS, progress=False)


def _low_rank_weight(rows, cols, rank: int, seed: int) -> torch.Tensor:
    """A dense matrix that is exactly an MPO with every inner bond of rank ``rank``."""
    generator = torch.Generator().manual_seed(seed)
    bonds = (1, *(rank,) * (len(rows) - 1), 1)
    cores = [
        torch.randn(bonds[k], i, j, bonds[k + 1], generator=generator, dtype=torch.float64)
        for k, (i, j) in enumerate(zip(rows, cols, strict=True))
    ]
    return mpo.MPO(cores).to_dense()


def test_one_row_per_target_and_rank_in_model_order(llama, result):
    targets = [m.name for m in plan(llama).modules]
    assert [row.module for row in result.rows] == [name for name in targets for _ in RANKS]
    assert [row.rank for row in result.rows] == list(RANKS) * len(targets)
    assert result.ranks == RANKS


def test_targets_follow_the_config_like_plan(llama):
    config = DoTAConfig(
        target_modules=["o_proj"], exclude_modules=[r"model.layers.1.self_attn.o_proj"]
    )
    result = analyze(llama, config, ranks=4, progress=False)
    assert [row.module for row in result.rows] == ["model.layers.0.self_attn.o_proj"]


def test_shapes_factors_and_params_follow_eq1(llama, result):
    modules = {m.name: m for m in plan(llama).modules}
    for row in result.rows:
        planned = modules[row.module]
        assert (row.shape, row.row_factors, row.col_factors) == (
            planned.shape,
            planned.row_factors,
            planned.col_factors,
        )
        assert row.bond_ranks == mpo.bond_ranks(row.row_factors, row.col_factors, row.rank)
        assert row.params == mpo.param_count(row.row_factors, row.col_factors, row.rank)


def test_errors_fall_with_the_rank_on_this_model(result):
    # Not a theorem for TT-SVD (NUMERICS.md), but it holds for this seeded model.
    by_module: dict[str, list[float]] = {}
    for row in result.rows:
        by_module.setdefault(row.module, []).append(row.mpo_error)
    for errors in by_module.values():
        assert all(a >= b for a, b in itertools.pairwise(errors)), errors
        assert 0 < errors[-1] < errors[0] <= 1


def test_errors_lie_within_the_bounds_the_spectra_give(result):
    # max_k tail_k <= ||W - MPO||^2 <= sum_k tail_k (relative to ||W||^2)
    for row in result.rows:
        spectra = result.spectra[row.module]
        energy = sum(float((s**2).sum()) for s in spectra[:1])
        tails = [
            float((s[r:] ** 2).sum()) / energy for s, r in zip(spectra, row.bond_ranks, strict=True)
        ]
        error_sq = row.mpo_error**2
        assert max(tails) * (1 - 1e-4) <= error_sq <= sum(tails) * (1 + 1e-4) + 1e-10


def test_spectra_match_unfolding_spectra(llama, result):
    weight = llama.model.layers[0].mlp.up_proj.weight.detach()
    row = next(r for r in result.rows if r.module == "model.layers.0.mlp.up_proj")
    expected = mpo.unfolding_spectra(weight, (row.row_factors, row.col_factors))
    got = result.spectra["model.layers.0.mlp.up_proj"]
    assert len(got) == len(expected) == len(row.row_factors) - 1
    for values, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(values, reference.numpy(), rtol=1e-10)


def test_svd_error_is_the_truncated_svd_at_the_same_budget(llama, result):
    weight = llama.model.layers[1].self_attn.q_proj.weight.detach().double()
    sigma = torch.linalg.svdvals(weight).numpy()
    for row in (r for r in result.rows if r.module == "model.layers.1.self_attn.q_proj"):
        assert row.svd_rank == row.params // sum(row.shape)
        expected = np.sqrt((sigma[row.svd_rank :] ** 2).sum() / (sigma**2).sum())
        assert row.svd_error == pytest.approx(expected, rel=1e-5)


def test_an_exact_low_rank_mpo_has_no_error_at_its_rank():
    rows, cols = mpo.factorize(64, 3), mpo.factorize(64, 3)
    layer = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(_low_rank_weight(rows, cols, rank=3, seed=1))
    model = torch.nn.ModuleDict({"q_proj": layer})
    result = analyze(model, ranks=(2, 3, 5), num_cores=3, progress=False)
    errors = {row.rank: row.mpo_error for row in result.rows}
    assert errors[2] > 1e-2
    assert errors[3] < 1e-5
    assert errors[5] < 1e-5
    assert float(result.spectra["q_proj"][0][3]) < 1e-5 * float(result.spectra["q_proj"][0][0])


def test_conv1d_weights_are_analyzed_as_out_x_in():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    result = analyze(model, target_modules=["c_attn"], ranks=4, progress=False)
    (row,) = result.rows
    assert row.shape == (96, 32)
    weight = model.transformer.h[0].attn.c_attn.weight.detach()  # stored (in, out)
    expected = mpo.unfolding_spectra(weight.T, (row.row_factors, row.col_factors))
    for values, reference in zip(result.spectra[row.module], expected, strict=True):
        np.testing.assert_allclose(values, reference.numpy(), rtol=1e-10)


def test_a_wrapped_model_is_analyzed_as_its_base_model(llama, result):
    # k_proj, v_proj (GQA), up_proj and down_proj are not square: a transpose would show
    wrapped = mpo.adapt.wrap(copy.deepcopy(llama), rank=2, num_cores=3, quiet=True)
    again = analyze(wrapped, ranks=RANKS, progress=False)
    assert [row.module for row in again.rows] == [row.module for row in result.rows]
    assert [row.mpo_error for row in again.rows] == [row.mpo_error for row in result.rows]


def test_a_bfloat16_model_is_analyzed_in_float32():
    layer = torch.nn.Linear(32, 32).to(torch.bfloat16)
    result = analyze(torch.nn.ModuleDict({"q_proj": layer}), ranks=(2, 64), progress=False)
    assert result.rows[-1].mpo_error < 1e-5  # full rank: exact up to float32 rounding
    assert result.spectra["q_proj"][0].dtype == np.float64


def test_table_has_a_line_per_row(result):
    lines = result.table().splitlines()
    assert lines[0].split()[:2] == ["module", "shape"]
    assert len(lines) == 1 + len(result.rows)
    assert str(result) == result.table()


def test_write_creates_consistent_files(result, tmp_path):
    pytest.importorskip("matplotlib")
    paths = result.write(tmp_path / "out")
    names = ["analysis.csv", "analysis.json", "errors.png", "spectra.png"]
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)  # no temp files
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert data == json.loads(json.dumps(result.to_json()))
    with open(tmp_path / "out" / "analysis.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(data["rows"]) == len(result.rows)
    for line, record in zip(table, data["rows"], strict=True):
        for key, value in record.items():
            if isinstance(value, list):
                assert line[key] == ",".join(map(str, value))
            elif isinstance(value, float):
                assert float(line[key]) == value
            else:
                assert line[key] == str(value)
    for png in paths[2:]:
        assert png.read_bytes().startswith(b"\x89PNG")
    assert set(data["spectra"]) == {row.module for row in result.rows}


def test_write_without_matplotlib_names_the_extra(result, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MPOError, match=r"mpo-dota\[demo\]"):
        result.write(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_matching_module_is_an_error(llama):
    with pytest.raises(MPOError, match="no module of LlamaForCausalLM matches"):
        analyze(llama, target_modules=["c_attn"], progress=False)


@pytest.mark.parametrize("ranks", [0, (4, 0), (), "8", (2.5,)])
def test_bad_ranks_are_errors(llama, ranks):
    with pytest.raises(MPOError, match="rank"):
        analyze(llama, ranks=ranks, progress=False)


def test_rank_instead_of_ranks_is_an_error(llama):
    with pytest.raises(MPOError, match=r"ranks=\[16\]"):
        analyze(llama, rank=16, progress=False)


def test_a_single_core_is_an_error(llama):
    with pytest.raises(MPOError, match="num_cores >= 2"):
        analyze(llama, num_cores=1, progress=False)


def test_meta_weights_are_an_error():
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(16, 16, device="meta")})
    with pytest.raises(MPOError, match="q_proj has its weight on the meta device"):
        analyze(model, ranks=2, progress=False)


def test_the_model_is_left_unchanged(llama):
    before = {name: p.clone() for name, p in llama.named_parameters()}
    analyze(llama, ranks=2, progress=False)
    assert all(torch.equal(before[name], p) for name, p in llama.named_parameters())
