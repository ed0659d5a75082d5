"""Δm% in its three conventions and the results table, on hand-computed results."""

import pytest

from auxmtl_jax import comparison


def _three_task_results(miou, normal_factor):
    """Results whose terms are easy by hand: pixel acc and depth at the reference, normals scaled uniformly."""
    return {'segmentation': {'miou': miou, 'pixel_acc': 0.7},
            'depth': {'abs_err': 0.5, 'rel_err': 0.2, 'rms': 1.0},
            'normal': {'mean': 20.0 * (2 - normal_factor), 'median': 20.0 * (2 - normal_factor),
                       'within_11.25': 0.3 * normal_factor, 'within_22.5': 0.5 * normal_factor,
                       'within_30': 0.6 * normal_factor}}


def test_delta_m_conventions_by_hand_disagree_in_sign():
    references = _three_task_results(0.4, 1.0)
    results = _three_task_results(0.448, 0.95)  # mIoU +12%; every normal metric 5% worse; the rest equal
    # per_task: segmentation (12 + 0) / 2 = 6, depth 0, normal -5 -> (6 + 0 - 5) / 3
    assert comparison.delta_m(results, references) == pytest.approx(1.0 / 3.0)
    assert comparison.delta_m(results, references, convention='per_task') == pytest.approx(1.0 / 3.0)
    # metric_set: (12 + 0 + 0 + 0 - 5 * 5) / 9 over the nine NYUv2 metrics
    assert comparison.delta_m(results, references, convention='metric_set') == pytest.approx(-13.0 / 9.0)
    # headline: mIoU +12, depth rms 0, normal mean -5
    assert comparison.delta_m(results, references, convention='headline') == pytest.approx(7.0 / 3.0)
    assert comparison.delta_m(references, references, convention='metric_set') == 0.0


def test_delta_m_two_tasks_and_shared_tasks_only():
    results = {'segmentation': {'miou': 0.5, 'pixel_acc': 0.77}, 'depth': {'abs_err': 0.4, 'rel_err': 0.25,
                                                                            'rms': 0.9}}
    references = {'segmentation': {'miou': 0.4, 'pixel_acc': 0.7}, 'depth': {'abs_err': 0.5, 'rel_err': 0.25,
                                                                             'rms': 1.0}, 'normal': {'mean': 20.0}}
    # seg: miou +25, pixel acc +10 -> 17.5; depth: abs err +20, rel err 0 -> 10; normals are not in the results.
    assert comparison.delta_m(results, references) == pytest.approx((17.5 + 10.0) / 2)
    assert comparison.delta_m(results, references, convention='metric_set') == pytest.approx((25 + 10 + 20 + 0) / 4)
    assert comparison.delta_m(results, references, convention='headline') == pytest.approx((25 + 10) / 2)
    assert comparison.delta_m(references, results, convention='headline') == pytest.approx((-20.0 - 100 / 9) / 2)


def test_delta_m_bad_inputs():
    good = {'depth': {'abs_err': 0.5, 'rel_err': 0.2}}
    with pytest.raises(ValueError, match='share no task'):
        comparison.delta_m({'normal': {'mean': 1.0}}, good)
    with pytest.raises(ValueError, match="depth/abs_err needs finite values and a non-zero reference"):
        comparison.delta_m(good, {'depth': {'abs_err': 0.0, 'rel_err': 0.2}})
    with pytest.raises(ValueError, match=r"needs depth/rel_err, missing from the references"):
        comparison.delta_m(good, {'depth': {'abs_err': 0.5}})
    with pytest.raises(ValueError, match=r"needs depth/rms, missing from the results"):
        comparison.delta_m(good, {'depth': {'rms': 1.0}}, convention='headline')
    with pytest.raises(ValueError, match=r"convention='mean'; expected one of per_task, metric_set, headline"):
        comparison.delta_m(good, good, convention='mean')


def test_describe_delta_m_names_the_metric_set():
    line = comparison.describe_delta_m('headline', ('segmentation', 'depth'))
    assert '`headline`' in line and 'segmentation: miou; depth: rms' in line and 'normal' not in line


def test_format_table_by_hand():
    rows = {'joint': {'segmentation': {'miou': 0.25, 'pixel_acc': 0.5},
                      'depth': {'abs_err': 0.61234, 'rel_err': 0.2}},
            'auxi_all': {'segmentation': {'miou': 0.3, 'pixel_acc': 0.55}, 'normal': {'median': 15.5}}}
    references = {'segmentation': {'miou': 0.2, 'pixel_acc': 0.5}, 'depth': {'abs_err': 0.5, 'rel_err': 0.2}}
    table = comparison.format_table(rows, references=references)
    lines = table.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1
    assert lines[0].split(' | ')[1].strip() == 'segmentation'
    assert lines[1].split() == ['|', 'miou%↑', 'pixel_acc%↑', '|', 'abs_err↓', 'rel_err↓', '|', 'median↓',
                                '|', 'Δm%↑']
    # joint: segmentation (+25 + 0) / 2, depth (-22.468 + 0) / 2 -> +0.63 (per_task); auxi_all: segmentation only
    assert lines[3].split() == ['joint', '|', '25.00', '50.00', '|', '0.6123', '0.2000', '|', '-', '|', '+0.63']
    assert lines[4].split() == ['auxi_all', '|', '30.00', '55.00', '|', '-', '-', '|', '15.50', '|', '+30.00']
    assert 'Δm% (per_task)' in lines[0]
    assert 'Δm%' not in comparison.format_table(rows)
    with pytest.raises(ValueError, match='unknown metric depth/mae'):
        comparison.format_table({'run': {'depth': {'mae': 1.0}}})
