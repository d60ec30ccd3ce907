import numpy as np
import pytest

from kerasunet.core.labels import (check_outputs, label_values, labels_from_probabilities,
                                   labels_from_probabilities_np, structure_of, targets_from_labels_np)

LABELS = np.array([[0, 1], [2, 1]], np.uint8)


@pytest.mark.parametrize("outputs, label_outputs, expected", [
    (("liver", "tumour"), None, [[[0, 0], [1, 0]], [[1, 1], [1, 0]]]),
    (("tumour",), ("liver", "tumour"), [[[0], [0]], [[1], [0]]]),  # a cascade's second stage
    (("liver",), ("liver", "tumour"), [[[0], [1]], [[1], [1]]]),   # the liver includes its tumours
    (("tumour",), None, [[[0], [1]], [[1], [1]]]),                 # tumour-only labels: 1 is tumour
])
def test_targets_follow_the_structures_the_labels_hold(outputs, label_outputs, expected):
    labels = LABELS if label_outputs or len(outputs) == 2 else np.minimum(LABELS, 1)
    np.testing.assert_array_equal(targets_from_labels_np(labels, outputs, label_outputs), expected)


def test_targets_refuse_a_structure_the_labels_lack():
    with pytest.raises(ValueError, match=r"Expected outputs held by the labels \('tumour',\)"):
        targets_from_labels_np(LABELS, ("liver",), ("tumour",))


@pytest.mark.parametrize("outputs", [(), ("tumour", "liver"), ("liver", "liver"), ("spleen",)])
def test_check_outputs_refuses_bad_structures(outputs):
    with pytest.raises(ValueError, match="Expected structures from"):
        check_outputs(outputs)


@pytest.mark.parametrize("outputs, expected", [
    (("liver", "tumour"), [[0, 1], [2, 2]]),  # tumour wins inside the liver
    (("tumour",), [[0, 0], [1, 1]]),
    (("liver",), [[0, 1], [1, 1]]),
])
def test_labels_from_probabilities_numpy_and_graph_agree(outputs, expected):
    liver = np.array([[0.1, 0.9], [0.8, 0.7]], np.float32)
    tumour = np.array([[0.2, 0.4], [0.9, 0.55]], np.float32)
    probs = np.stack([liver, tumour] if len(outputs) == 2 else [tumour if outputs == ("tumour",) else liver], -1)
    np.testing.assert_array_equal(labels_from_probabilities_np(probs, outputs), expected)
    np.testing.assert_array_equal(np.asarray(labels_from_probabilities(probs, outputs)), expected)
    assert label_values(outputs) == {name: i + 1 for i, name in enumerate(outputs)}


@pytest.mark.parametrize("name, structure", [("liver", "liver"), ("Liver tumor", "tumour"), ("cancer", "tumour"),
                                             ("liverkyst", None), ("spleen", None), ("background", None)])
def test_structure_of_label_names(name, structure):
    assert structure_of(name) == structure


def test_relabel_keeps_the_structures_asked_for():
    from kerasunet.core.labels import relabel_np

    both = np.array([0, 1, 2], np.uint8)  # liver and tumour (CT, ATLAS)
    np.testing.assert_array_equal(relabel_np(both, ("liver", "tumour"), ("tumour",)), [0, 0, 1])
    np.testing.assert_array_equal(relabel_np(both, ("liver", "tumour"), ("liver",)), [0, 1, 1])  # liver holds tumour
    np.testing.assert_array_equal(relabel_np(both, "ct", ("liver", "tumour")), both)
    with pytest.raises(ValueError, match=r"^Expected outputs held by the labels \('tumour',\)\. "
                                         r"Received: outputs=\('liver', 'tumour'\)$"):
        relabel_np(np.array([0, 1], np.uint8), ("tumour",), ("liver", "tumour"))


def test_shared_outputs_and_modality_names():
    from kerasunet.core.labels import as_outputs, shared_outputs

    assert as_outputs("mri") == ("tumour",) and as_outputs(["liver", "tumour"]) == ("liver", "tumour")
    assert shared_outputs(("liver", "tumour"), ("tumour",)) == ("tumour",)
    assert shared_outputs(("liver",), ("tumour",)) == ()
    with pytest.raises(ValueError, match=r"^Expected structures or a modality in \('ct', 'mri'\)\. "
                                         r"Received: outputs='pet'$"):
        as_outputs("pet")
