"""Metrics against small hand-computed examples."""

import math

import numpy as np
import pytest

from backend.study.metrics import (
    confusion_matrix,
    labeling_accuracy,
    macro_f1,
    per_class_f1,
    per_class_precision,
    per_class_recall,
)

TRUE = [0, 0, 1, 1, 2, 2]
PRED = [0, 1, 1, 1, 0, 2]
CM = confusion_matrix(TRUE, PRED, 3)


def test_confusion_matrix_hand_example():
    assert CM.dtype == np.int64
    assert CM.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_per_class_scores_hand_example():
    assert per_class_recall(CM) == pytest.approx([0.5, 1.0, 0.5])
    assert per_class_precision(CM) == pytest.approx([0.5, 2 / 3, 1.0])
    # F1 = 2PR / (P + R): 0.5, 2*(2/3)/(5/3) = 0.8, 2*0.5/1.5 = 2/3
    assert per_class_f1(CM) == pytest.approx([0.5, 0.8, 2 / 3])
    assert macro_f1(CM) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(CM, classes=[1, 2]) == pytest.approx((0.8 + 2 / 3) / 2)


def test_perfect_prediction():
    labels = [0, 1, 2, 2, 3, 0]
    cm = confusion_matrix(labels, labels, 4)
    assert np.array_equal(cm, np.diag([2, 1, 2, 1]))
    assert per_class_f1(cm).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert macro_f1(cm) == 1.0
    assert labeling_accuracy(labels, labels) == 1.0


def test_undefined_classes_are_nan_and_skipped():
    # class 0: true and predicted; class 1: never true but predicted once;
    # class 2: true once, never predicted; class 3: absent everywhere.
    cm = confusion_matrix([0, 0, 2], [0, 1, 0], 4)
    recall = per_class_recall(cm)
    precision = per_class_precision(cm)
    f1 = per_class_f1(cm)
    assert recall[0] == 0.5 and math.isnan(recall[1]) and recall[2] == 0.0
    assert precision[0] == 0.5 and precision[1] == 0.0 and math.isnan(precision[2])
    assert f1[0] == pytest.approx(0.5) and f1[1] == 0.0 and f1[2] == 0.0
    assert math.isnan(recall[3]) and math.isnan(precision[3]) and math.isnan(f1[3])
    assert macro_f1(cm) == pytest.approx(0.5 / 3)
    assert math.isnan(macro_f1(cm, classes=[3]))
    assert math.isnan(macro_f1(cm, classes=[]))


def test_labeling_accuracy():
    assert labeling_accuracy(TRUE, PRED) == pytest.approx(4 / 6)
    assert math.isnan(labeling_accuracy([], []))


def test_empty_confusion_matrix():
    cm = confusion_matrix([], [], 2)
    assert cm.tolist() == [[0, 0], [0, 0]]
    assert math.isnan(macro_f1(cm))


@pytest.mark.parametrize(
    ("true", "pred", "n_classes"),
    [
        ([0, 3], [0, 1], 3),  # true out of range
        ([0, 1], [0, 5], 3),  # pred out of range
        ([0, -1], [0, 1], 3),
        ([0, 1], [0, 1, 1], 3),
        ([0.0, 1.0], [0, 1], 3),
        ([[0, 1]], [[0, 1]], 3),
        ([0, 1], [0, 1], 0),
        ([0, 1], [0, 1], 2.0),
    ],
)
def test_confusion_matrix_rejects_bad_input(true, pred, n_classes):
    with pytest.raises(ValueError):
        confusion_matrix(true, pred, n_classes)


@pytest.mark.parametrize(
    "cm",
    [np.zeros((2, 3), dtype=int), np.array([[1, -1], [0, 1]]), np.ones((2, 2)), np.ones(3, int)],
)
@pytest.mark.parametrize("fn", [per_class_recall, per_class_precision, per_class_f1, macro_f1])
def test_bad_confusion_matrix_raises(fn, cm):
    with pytest.raises(ValueError):
        fn(cm)


@pytest.mark.parametrize("classes", [[3], [-1], [0.5]])
def test_macro_f1_rejects_bad_classes(classes):
    with pytest.raises(ValueError):
        macro_f1(CM, classes=classes)


def test_labeling_accuracy_rejects_bad_input():
    with pytest.raises(ValueError):
        labeling_accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        labeling_accuracy([0, -1], [0, 1])
