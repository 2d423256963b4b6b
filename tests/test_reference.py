"""The float64 reference (asif.reference) on an example small enough to work by hand."""
import numpy as np

from asif import reference


def test_relative_representation_by_hand():
    # 3 anchors in 2-D; the query (1, 0) has cosines 1, 0.6, -0.8 to them
    anchors = np.array([[1.0, 0.0], [0.6, 0.8], [-0.8, 0.6]])
    q = np.array([[2.0, 0.0]])
    np.testing.assert_allclose(reference.relative_representation(q, anchors, k=1, p=1), [[1, 0, 0]])
    # k = 2, p = 2: (1, 0.36) normalised; the negative cosine never survives
    want = np.array([[1, 0.36, 0]]) / np.hypot(1, 0.36)
    np.testing.assert_allclose(reference.relative_representation(q, anchors, k=3, p=2), want)
    # ties go to the lower anchor index
    twins = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(reference.relative_representation(np.array([[0.0, 1.0]]), twins, 1, 8), [[1, 0, 0]])


def test_similarity_and_class_scores_by_hand():
    a_img = np.eye(3)
    a_txt = np.eye(3)[[0, 1, 2]]
    images = np.array([[1.0, 0.1, 0.0]])
    prompts = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.2]])  # 2 classes x 2
    s = reference.similarity(images, prompts, a_img, a_txt, k=1, p=1)
    np.testing.assert_allclose(s, [[0, 1, 0, 1]])
    np.testing.assert_allclose(reference.class_scores(a_img, a_txt, images, prompts, 2, 1, 1, "max"), [[1, 1]])
    np.testing.assert_allclose(reference.class_scores(a_img, a_txt, images, prompts, 2, 1, 1, "mean"),
                               [[np.sqrt(0.5), np.sqrt(0.5)]])


def test_a_class_that_keeps_no_anchor_scores_zero_in_both_reductions():
    # found by the property suite: the prompt-ensemble mean of all-zero r(t) was 0/0 = NaN here, 0 in the core
    a_img, a_txt = np.array([[1.0]]), np.array([[1.0]])
    images, prompts = np.array([[2.0]]), np.array([[-1.0], [3.0]])  # class 0's prompt has a negative cosine
    for reduce in ("max", "mean"):
        np.testing.assert_array_equal(reference.class_scores(a_img, a_txt, images, prompts, 2, 1, 1, reduce), [[0, 1]])
