"""Gradient sampling and main/aux split on a tiny hand-written conv net; figures and the plot CLI on small workdirs."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from auxmtl_jax.analysis import figures, gradients, images, plot

TASKS = ("segmentation", "depth", "normal")


def _tiny_encoder(key, widths=(3, 4, 6, 8)):
    """Params of a 3-stage conv encoder with a stem, BN-free, in the linen {'kernel', 'bias'} layout."""
    keys = jax.random.split(key, len(widths))
    params = {}
    for index, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        name = "stem" if index == 0 else f"block{index}"
        params[name] = {"conv": {"kernel": 0.5 * jax.random.normal(keys[index], (3, 3, c_in, c_out)),
                                 "bias": jnp.zeros(c_out)}}
    params["block2"]["norm"] = {"scale": jnp.ones(widths[-1])}  # a non-conv leaf that must not be sampled
    return params


def _encode(encoder, images):
    """Returns the stage outputs O_1..O_3 (what aux modules read) and the final feature."""
    features, x = [], images
    for name in ("stem", "block1", "block2"):
        x = jax.lax.conv_general_dilated(x, encoder[name]["conv"]["kernel"], (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jnp.tanh(x + encoder[name]["conv"]["bias"])
        features.append(x)
    return features


def _params(key, with_aux=True):
    encoder_key, decoder_key, aux_key = jax.random.split(key, 3)
    params = {"main": {"encoder": _tiny_encoder(encoder_key),
                       "decoders": {"depth": jax.random.normal(decoder_key, (8, 1))}}}
    if with_aux:
        params["aux"] = {"depth": jax.random.normal(aux_key, (4 + 6, 1))}
    return params


def _loss_parts_fn(params, images, depth_target, aux_weight=1.0):
    """Main depth loss from the last stage; aux loss from pooled stage-1/2 features (as the aux modules do)."""

    def loss_parts(encoder):
        features = _encode(encoder, images)
        main_prediction = features[-1].mean(axis=(1, 2)) @ params["main"]["decoders"]["depth"]
        main_loss = jnp.mean((main_prediction - depth_target) ** 2)
        if "aux" not in params:
            return main_loss, 0.0
        pooled = jnp.concatenate([f.mean(axis=(1, 2)) for f in features[:2]], axis=-1)
        aux_loss = aux_weight * jnp.mean(jnp.abs(pooled @ params["aux"]["depth"] - depth_target))
        return main_loss, aux_loss

    return loss_parts


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32), jnp.asarray(rng.uniform(1, 3, (2, 1)),
                                                                                   jnp.float32)


def test_conv_layers_are_the_4d_kernels_in_depth_order():
    layers = gradients.encoder_conv_layers(_tiny_encoder(jax.random.key(0)))
    assert layers == ["stem/conv/kernel", "block1/conv/kernel", "block2/conv/kernel"]


def test_sampling_is_deterministic_and_shared_by_encoders_of_the_same_architecture():
    first = _tiny_encoder(jax.random.key(1))
    second = _tiny_encoder(jax.random.key(2))
    assert not np.allclose(first["stem"]["conv"]["kernel"], second["stem"]["conv"]["kernel"])
    a = gradients.sample_coordinates(first, samples_per_layer=20, seed=7)
    b = gradients.sample_coordinates(second, samples_per_layer=20, seed=7)
    again = gradients.sample_coordinates(first, samples_per_layer=20, seed=7)
    other_seed = gradients.sample_coordinates(first, samples_per_layer=20, seed=8)
    assert list(a) == list(b) == list(again)
    for layer in a:
        np.testing.assert_array_equal(a[layer], b[layer])
        np.testing.assert_array_equal(a[layer], again[layer])
    assert any(not np.array_equal(a[layer], other_seed[layer]) for layer in a)


def test_sampling_covers_every_conv_layer_within_bounds_without_duplicates():
    encoder = _tiny_encoder(jax.random.key(3))
    sizes = {layer: int(np.prod(np.shape(leaf))) for layer, leaf in
             [("stem/conv/kernel", encoder["stem"]["conv"]["kernel"]),
              ("block1/conv/kernel", encoder["block1"]["conv"]["kernel"]),
              ("block2/conv/kernel", encoder["block2"]["conv"]["kernel"])]}
    samples = 200  # more than stem (108) and block1 (216 > 200); less than block2 (432)
    coordinates = gradients.sample_coordinates(encoder, samples_per_layer=samples, seed=0)
    assert set(coordinates) == set(sizes)
    for layer, indices in coordinates.items():
        assert len(np.unique(indices)) == len(indices) == min(samples, sizes[layer])
        assert indices.min() >= 0 and indices.max() < sizes[layer]
    np.testing.assert_array_equal(coordinates["stem/conv/kernel"], np.arange(sizes["stem/conv/kernel"]))


def test_sampling_rejects_bad_arguments():
    encoder = _tiny_encoder(jax.random.key(0))
    with pytest.raises(ValueError, match="samples_per_layer must be >= 1"):
        gradients.sample_coordinates(encoder, samples_per_layer=0, seed=0)
    with pytest.raises(ValueError, match=r"unknown encoder conv layer\(s\) \['nope/kernel'\]"):
        gradients.sample_coordinates(encoder, samples_per_layer=4, layers=["nope/kernel"])
    with pytest.raises(ValueError, match="no conv kernels"):
        gradients.sample_coordinates({"dense": {"kernel": jnp.ones((3, 4))}}, samples_per_layer=4)


def test_mean_abs_grad_averages_the_sampled_entries():
    grads = {"conv": {"kernel": jnp.arange(-8.0, 8.0).reshape(2, 2, 2, 2)}}
    result = gradients.mean_abs_grad(grads, {"conv/kernel": np.array([0, 1, 15])})
    assert float(result["conv/kernel"]) == pytest.approx((8 + 7 + 7) / 3)
    with pytest.raises(ValueError, match="not found in the encoder gradients"):
        gradients.mean_abs_grad(grads, {"other/kernel": np.array([0])})


def test_main_and_aux_parts_sum_to_the_total_encoder_gradient(batch):
    images, target = batch
    params = _params(jax.random.key(4))
    loss_parts = _loss_parts_fn(params, images, target)

    @jax.jit
    def split_and_reference(encoder):
        main_part, aux_part = gradients.split_encoder_gradient(loss_parts, encoder)
        total = jax.grad(lambda e: sum(loss_parts(e)))(encoder)
        main_only = jax.grad(lambda e: loss_parts(e)[0])(encoder)
        return main_part, aux_part, total, main_only

    main_part, aux_part, total, main_only = split_and_reference(params["main"]["encoder"])
    for summed, expected in zip(jax.tree.leaves(jax.tree.map(jnp.add, main_part, aux_part)), jax.tree.leaves(total)):
        np.testing.assert_allclose(summed, expected, rtol=1e-5, atol=1e-6)
    for got, expected in zip(jax.tree.leaves(main_part), jax.tree.leaves(main_only)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Aux modules read stages 1-2 only, so the last stage gets no aux gradient while the earlier ones do.
    assert float(jnp.abs(aux_part["stem"]["conv"]["kernel"]).sum()) > 0
    assert float(jnp.abs(aux_part["block2"]["conv"]["kernel"]).max()) == 0.0


def test_log_entries_under_jit_match_the_split_and_aux_part_is_zero_without_aux(batch):
    images, target = batch
    coordinates = gradients.sample_coordinates(_params(jax.random.key(5))["main"]["encoder"], samples_per_layer=16)

    def entries_for(params):
        return jax.jit(lambda p: gradients.gradient_log_entries(_loss_parts_fn(p, images, target), p, coordinates))(
            params)

    params = _params(jax.random.key(6))
    entries = entries_for(params)
    prefixes = ("grad", "grad_main", "grad_aux")
    assert set(entries) == {f"{prefix}/{layer}" for prefix in prefixes for layer in coordinates}
    main_part, aux_part = gradients.split_encoder_gradient(_loss_parts_fn(params, images, target),
                                                           params["main"]["encoder"])
    total = jax.tree.map(jnp.add, main_part, aux_part)
    for prefix, grads in (("grad", total), ("grad_main", main_part), ("grad_aux", aux_part)):
        for layer, value in gradients.mean_abs_grad(grads, coordinates).items():
            assert float(entries[f"{prefix}/{layer}"]) == pytest.approx(float(value), rel=1e-5)
    assert float(entries["grad_aux/stem/conv/kernel"]) > 0

    no_aux = entries_for(_params(jax.random.key(6), with_aux=False))
    for layer in coordinates:
        assert float(no_aux[f"grad_aux/{layer}"]) == 0.0
        assert float(no_aux[f"grad/{layer}"]) == float(no_aux[f"grad_main/{layer}"]) > 0
        assert float(no_aux[f"grad_main/{layer}"]) == pytest.approx(float(entries[f"grad_main/{layer}"]), rel=1e-5)


def test_log_entries_reject_params_without_an_encoder(batch):
    with pytest.raises(ValueError, match=r"params\['main'\]\['encoder'\]; got top level \['encoder'\]"):
        gradients.gradient_log_entries(lambda e: (0.0, 0.0), {"encoder": {}}, {})


LAYERS = ("stem/conv/kernel", "block1/expand/conv/kernel", "block2/project/conv/kernel", "block10/conv/kernel")


def _write_run(workdir, *, tasks, aux_scale, results=None, steps=12, grad_every=2):
    """A metrics.jsonl (and optionally results.json) in the exact format a training run writes."""
    workdir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        line = {"step": step, "kind": "train", "loss/total": 0.0, "lr": 0.01 * (1 - step / steps) ** 0.9,
                "images_per_sec": 100.0}
        for task in tasks:
            line[f"loss/{task}"] = 2.0 / step
            line[f"ds_loss/{task}"] = 1.0 / step
            line["loss/total"] += line[f"loss/{task}"]
            if aux_scale:
                line[f"aux_loss/{task}"] = 1.5 / step
        if step % grad_every == 0:
            for depth, layer in enumerate(LAYERS):
                line[f"grad_main/{layer}"] = 0.01 / (depth + 1)
                line[f"grad_aux/{layer}"] = aux_scale * 0.01 / (depth + 1)
                line[f"grad/{layer}"] = line[f"grad_main/{layer}"] + line[f"grad_aux/{layer}"]
        lines.append(json.dumps(line))
        if step % 6 == 0:
            lines.append(json.dumps({"step": step, "kind": "eval", "depth/abs_err": 1.0 / step}))
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if results is not None:
        (workdir / "results.json").write_text(json.dumps({"name": workdir.name, "step": steps, **results}))


@pytest.fixture()
def sweep(tmp_path):
    root = tmp_path / "sweep"
    _write_run(root / "single_segmentation", tasks=["segmentation"], aux_scale=0.0,
               results={"metrics": {"segmentation": {"miou": 0.40, "pixel_acc": 0.7}}, "delta_m": None})
    _write_run(root / "single_depth", tasks=["depth"], aux_scale=0.0,
               results={"metrics": {"depth": {"abs_err": 0.60, "rel_err": 0.2}}, "delta_m": None})
    _write_run(root / "single_normal", tasks=["normal"], aux_scale=0.0,
               results={"metrics": {"normal": {"mean": 30.0}}, "delta_m": None})
    _write_run(root / "joint", tasks=TASKS, aux_scale=0.0,
               results={"metrics": {"segmentation": {"miou": 0.38}, "depth": {"abs_err": 0.62},
                                    "normal": {"mean": 31.0}}, "delta_m": -2.5})
    _write_run(root / "auxi_all", tasks=TASKS, aux_scale=1.0,
               results={"metrics": {"segmentation": {"miou": 0.43}, "depth": {"abs_err": 0.55},
                                    "normal": {"mean": 29.0}}, "delta_m": 4.1})
    return root


def _assert_images(paths, suffixes):
    assert sorted(p.suffix for p in paths) == sorted(suffixes)
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000
        head = path.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in path.read_bytes()[:2000]


def test_read_metrics_sorts_by_step_keeps_the_last_duplicate_and_drops_a_cut_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "kind": "train", "loss/depth": 5.0}\n{"step": 1, "kind": "train", "loss/depth": 9.0}\n'
        '{"step": 2, "kind": "train", "loss/depth": 4.0}\n{"step": 3, "kind": "tra')
    records = figures.read_metrics(tmp_path)
    steps, values = figures.metric_series(records, "loss/depth")
    assert steps.tolist() == [1, 2] and values.tolist() == [9.0, 4.0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind"\n{"step": 2, "kind": "train"}\n')
    with pytest.raises(figures.AnalysisInputError, match=r"metrics.jsonl:1: not valid JSON"):
        figures.read_metrics(tmp_path)


def test_sweep_figures_from_small_workdirs(sweep, tmp_path):
    runs = {path.name: path for path in sorted(sweep.iterdir())}
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 4, (2, 8, 8, 1)).astype(np.float32)
    depth[0, :2] = 0.0
    normal = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    examples = {"image": rng.normal(size=(2, 8, 8, 3)).astype(np.float32),
                "segmentation": rng.integers(0, 5, (2, 8, 8)).astype(np.int32),
                "prediction/segmentation": rng.normal(size=(2, 8, 8, 5)).astype(np.float32),
                "depth": depth, "prediction/depth": depth * 1.1,
                "normal": normal, "prediction/normal": -normal}
    out_dir = tmp_path / "figures"
    written = figures.write_sweep_figures(runs, out_dir, task="depth", prediction_examples=examples,
                                          denormalise=((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)))
    assert {p.name for p in written} == {"fig5_gradients.png", "fig5_gradients.svg", "fig3_strategies.png",
                                         "fig3_strategies.svg", "fig6_predictions.png"}
    _assert_images(written, [p.suffix for p in written])
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in written)  # no temporaries left


def test_sweep_without_gradient_logs_still_gets_its_scatter(sweep, tmp_path, caplog):
    """A sweep trained with analysis.grad_log_every_steps=0 (or fewer steps than it) leaves Fig. 5 out, not the run."""
    runs = {}
    for path in sorted(sweep.iterdir()):
        copy = tmp_path / "runs" / path.name
        copy.mkdir(parents=True)
        (copy / "results.json").write_bytes((path / "results.json").read_bytes())
        kept = [line for line in (path / "metrics.jsonl").read_text().splitlines()
                if not any(key.startswith("grad") for key in json.loads(line))]
        (copy / "metrics.jsonl").write_text("\n".join(kept) + "\n")
        runs[path.name] = copy
    written = figures.write_sweep_figures(runs, tmp_path / "figures", task="depth")
    assert {p.name for p in written} == {"fig3_strategies.png", "fig3_strategies.svg"}
    assert "left out fig5_gradients.png: no run logs both gradient entries" in caplog.text


def test_fig5_shows_multi_task_runs_and_three_layers_spread_across_depth(sweep):
    metrics = {path.name: figures.read_metrics(path) for path in sweep.iterdir()}
    selected = figures.select_fig5_runs(metrics, "depth")
    assert sorted(selected) == ["auxi_all", "joint"]
    figure = figures.gradient_curves(selected, loss_key="loss/depth")
    titles = [axes.get_title() for axes in figure.axes if axes.get_visible()]
    assert titles == ["stem/conv/kernel", "block2/project/conv/kernel", "block10/conv/kernel", "training loss/depth"]
    auxi_curve = figure.axes[0].get_lines()[-1].get_ydata()
    joint_curve = figure.axes[0].get_lines()[1].get_ydata()
    assert np.all(auxi_curve > joint_curve)  # grad = main + aux is larger with aux modules


def test_fig3_points_references_and_left_out_runs(sweep):
    results = {path.name: figures.read_results(path) for path in sweep.iterdir()}
    assert figures.choose_scatter_metrics(results) == ("segmentation/miou", "depth/abs_err")
    points, references, left_out = figures.partition_scatter_runs(results, "segmentation/miou", "depth/abs_err")
    assert points == {"joint": (0.38, 0.62), "auxi_all": (0.43, 0.55)}
    assert references == {"x": [("single_segmentation", 0.40)], "y": [("single_depth", 0.60)]}
    assert list(left_out) == ["single_normal"]
    with pytest.raises(figures.AnalysisInputError, match=r"unknown metric 'depth/rms': no run has it; available"):
        figures.strategy_scatter(results, "segmentation/miou", "depth/rms")
    with pytest.raises(figures.AnalysisInputError, match="expected 'task/metric'"):
        figures.strategy_scatter(results, "miou", "depth/abs_err")


def test_plot_cli_writes_fig5_and_fig3(sweep, tmp_path, capsys):
    fig5 = tmp_path / "out" / "fig5.png"
    assert plot.main(["fig5", f"joint={sweep / 'joint'}", f"auxi={sweep / 'auxi_all'}", "--task", "depth",
                      "--out", str(fig5)]) == 0
    _assert_images([fig5, fig5.with_suffix(".svg")], [".png", ".svg"])
    fig3 = tmp_path / "out" / "fig3.png"
    assert plot.main(["fig3", str(sweep), "--x", "segmentation/miou", "--y", "depth/abs_err",
                      "--out", str(fig3)]) == 0
    _assert_images([fig3, fig3.with_suffix(".svg")], [".png", ".svg"])
    captured = capsys.readouterr()
    assert f"wrote {fig5}" in captured.out and f"wrote {fig3}" in captured.out
    assert "left out run 'single_normal'" in captured.err


@pytest.mark.parametrize("make_args, message", [
    (lambda sweep, tmp: ["fig5", f"joint={tmp / 'missing'}"], "missing: no such workdir"),
    (lambda sweep, tmp: ["fig5", f"joint={tmp}"], "no metrics.jsonl; expected a training workdir"),
    (lambda sweep, tmp: ["fig5", f"joint={sweep / 'joint'}", "--task", "edges"],
     r"no train entries for 'loss/edges'; available: \['loss/depth', 'loss/normal', 'loss/segmentation'\]"),
    (lambda sweep, tmp: ["fig5", f"joint={sweep / 'joint'}", "--layers", "stem/conv/kernel,nope/kernel"],
     "layer 'nope/kernel' was not logged"),
    (lambda sweep, tmp: ["fig3", str(sweep), "--x", "segmentation/miou", "--y", "depth/bogus"],
     "unknown metric 'depth/bogus'"),
    (lambda sweep, tmp: ["fig3", f"a={sweep / 'joint'}", f"a={sweep / 'auxi_all'}"], "run name 'a' given twice"),
])
def test_plot_cli_reports_one_clear_error_and_writes_nothing(sweep, tmp_path, capsys, make_args, message):
    out = tmp_path / "out" / "figure.png"
    with pytest.raises(SystemExit) as raised:
        plot.main(make_args(sweep, tmp_path) + ["--out", str(out)])
    assert raised.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    assert re.search(message, error[0])
    assert not out.parent.exists()


def test_missing_metrics_file_and_bad_results_are_named(tmp_path):
    with pytest.raises(figures.AnalysisInputError, match=r"metrics.jsonl: not found"):
        figures.read_metrics(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"name": "x", "metrics": {"depth": 3.0}}))
    with pytest.raises(figures.AnalysisInputError, match=r"results.json: expected a non-empty 'metrics' object"):
        figures.read_results(tmp_path)


def test_prediction_grid_accepts_uint8_or_denormalised_images(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (1, 8, 8)).astype(np.int32)
    labels[0, 0, 0] = 255
    pixels = rng.integers(0, 256, (1, 8, 8, 3)).astype(np.uint8)
    mean, std = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)
    normalised = (pixels - np.array(mean)) / np.array(std)
    np.testing.assert_array_equal(images.display_images(normalised.astype(np.float32), (mean, std)), pixels)
    out = tmp_path / "grid.png"
    assert images.write_prediction_grid(pixels, {"segmentation": labels}, {"segmentation": labels}, out,
                                         num_classes=3) == [out]
    _assert_images([out], [".png"])
    with pytest.raises(figures.AnalysisInputError, match=r"need denormalise=\(mean, std\)"):
        images.write_prediction_grid(normalised, {"segmentation": labels}, {}, tmp_path / "bad.png", num_classes=3)
    with pytest.raises(figures.AnalysisInputError, match="4 logit channels; expected num_classes=3"):
        images.write_prediction_grid(pixels, {"segmentation": np.zeros((1, 8, 8, 4))}, {}, tmp_path / "bad.png",
                                      num_classes=3)
    assert not (tmp_path / "bad.png").exists()
