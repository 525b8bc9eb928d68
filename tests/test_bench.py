"""The benchmark's CPU-side pieces: the FLOP count, the ratio table, the CLI without a GPU."""

import pytest
import torch

from flash_inductor import bench, cli


def test_flops_match_the_seed_convention():
    assert bench.flops(1, 12, 8192, 8192, 128, False, "fwd") == 4 * 12 * 8192**2 * 128
    assert bench.flops(1, 12, 8192, 8192, 128, True, "bwd") == 2.5 * 2 * 12 * 8192**2 * 128


def _row(case, peer, fwd, bwd):
    return {"n": 4096, "case": case, "peer": peer, "status": "ok", "fwd_us": fwd, "bwd_us": bwd,
            "fwd+bwd_us": fwd + bwd, "fwd_tflops": 1.0, "bwd_tflops": 1.0}


def test_markdown_ratio_is_best_peer_time_over_ours():
    rows = [
        _row("bias", "triton", 200.0, 400.0),
        _row("bias", "flex", 300.0, 500.0),
        _row("bias", "sdpa_cudnn", 250.0, 800.0),
        _row("bias", "eager", 10.0, 10.0),  # the eager reference is never "the best peer"
        {"n": 4096, "case": "dropout", "peer": "flex", "status": "refused", "reason": "x"},
    ]
    table = bench.markdown(rows, ["triton", "flex", "sdpa_cudnn", "eager"])
    line = next(l for l in table.splitlines() if l.startswith("| bias"))
    assert line.rstrip().endswith("| 1.25 | 1.25 |")  # fwd 250/200, bwd 500/400
    assert "refused" in next(l for l in table.splitlines() if l.startswith("| dropout"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_gpu_says_so(capsys):
    assert cli.main(["bench", "--lengths", "128"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def _e2e_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "e2e_models.py"
    spec = importlib.util.spec_from_file_location("e2e_models", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    return e2e


def test_e2e_script_runs_a_tiny_model_through_all_three_backends():
    e2e = _e2e_module()
    row = e2e.run_row("bert", "tiny", torch.device("cpu"), torch.float32, repeats=1, impl="sdpa", out=lambda *a, **k: None)
    assert row["rewritten"] == row["attention_layers"] == 2
    for backend in e2e.BACKENDS:
        assert row[f"{backend}_fwd_ms"] > 0 and row[f"{backend}_train_ms"] > 0
    assert row["flash_rel_diff_fwd"] < 1e-4
    # Interleaved rounds: every backend timed BLOCKS times, both compiled models kept their graphs.
    for mode in ("fwd", "train"):
        assert all(len(row[f"{b}_{mode}_block_medians_ms"]) == e2e.BLOCKS for b in e2e.BACKENDS)
        assert row[f"inductor_over_flash_{mode}_paired"] > 0
    assert row["graphs_compiled_while_timing"] == 0
    table = e2e.markdown([row])
    assert "| bert (16 × 2), sdpa | 2/2 |" in table and "Geometric mean" in table


def test_e2e_script_times_one_mode_alone():
    """`--modes forward`: nothing is compiled or timed for training (one graph per frame)."""
    import math

    e2e = _e2e_module()
    row = e2e.run_row("bert", "tiny", torch.device("cpu"), torch.float32, repeats=1, impl="sdpa",
                      out=lambda *a, **k: None, modes=("forward",))
    for backend in e2e.BACKENDS:
        assert row[f"{backend}_fwd_ms"] > 0 and math.isnan(row[f"{backend}_train_ms"])
    assert row["flash_rel_diff_fwd"] < 1e-4


@pytest.mark.parametrize("together", [False, True])
def test_e2e_script_isolates_each_backend_in_its_own_process(together):
    """`--isolate`: one worker process per backend, timed in the same rotated rounds; with
    `--compile-together` the workers compile at once and are measured one at a time after."""
    import math

    e2e = _e2e_module()
    lines = []
    row = e2e.run_row_isolated("bert", "tiny", torch.device("cpu"), torch.float32, repeats=1, impl="sdpa",
                               out=lambda *a, **k: lines.append(a), modes=("forward",), compile_together=together)
    assert row["isolated"] and row["compiled_together"] == together
    assert row["rewritten"] == row["attention_layers"] == 2
    assert all(row[f"{b}_first_call_s"] > 0 for b in e2e.BACKENDS) and len(lines) >= len(e2e.BACKENDS)
    assert all(len(row[f"{b}_fwd_block_medians_ms"]) == e2e.BLOCKS for b in e2e.BACKENDS)
    for backend in e2e.BACKENDS:
        assert row[f"{backend}_fwd_ms"] > 0 and math.isnan(row[f"{backend}_train_ms"])
    # The workers built the same seeded weights: the compiled outputs match the eager worker's.
    assert row["flash_rel_diff_fwd"] < 1e-4 and row["inductor_rel_diff_fwd"] < 1e-4
    assert row["inductor_over_flash_fwd_paired"] > 0


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("bias", "triton", 200.0, 400.0), _row("bias", "flex", 300.0, 500.0)]
    meta = {"device": "test", "torch": torch.__version__, "triton": "-"}
    out = tmp_path / "plot.png"
    bench.plot([{"meta": meta, "rows": rows}], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
