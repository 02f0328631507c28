"""pact_cache/rows.py: what is computed from a cache's rows below the commands (padding, row keys, the step-0
refusal mass); Reuse is tested through build --reuse (test_build.py), the token mask through score (test_score.py)."""

import numpy as np
import torch

from pact_cache.rows import right_pad, row_key, step0_refusal_mass


def test_right_pad_takes_lists_arrays_and_tensors_alike():
    rows = [[5, 6, 7], np.array([8], np.int32), torch.tensor([9, 10])]
    ids, mask = right_pad(rows, pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2], [9, 10, 2]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    ids8, mask8 = right_pad(rows, pad_id=0, multiple=8)
    assert (
        ids8.shape == (3, 8) and mask8.sum().item() == 6 and ids8[:, :3].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    )


def test_a_row_key_is_its_tokens_and_its_response_start():
    assert row_key([1, 2, 3], 2) == row_key(np.array([1, 2, 3], np.int32), 2)
    assert row_key([1, 2, 3], 2) != row_key([1, 2, 3], 1)
    assert row_key([1, 2, 3], 2) != row_key([1, 2, 4], 2)
    assert len(row_key([1], 0)) == 32


def test_the_step0_refusal_mass_sums_the_positive_tokens_probabilities_before_the_answer():
    class Row:
        ref = {"full": np.log(np.array([[0.5, 0.3, 0.1], [0.9, 0.05, 0.01]], np.float32))}

    keep = np.array([True, False, True])
    assert abs(step0_refusal_mass(Row(), keep) - 0.6) < 1e-6  # step 0 only, tokens 0 and 2
