"""kernels.argmax.argmax_rows against torch.argmax: odd and chunk-crossing vocab sizes, ties across chunks,
NaN and infinities, strided rows, every dtype (CPU: Triton interpreter)."""

import pytest
import torch

from attnforge.kernels.argmax import CHUNK, argmax_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("vocab", [1, 7, CHUNK, CHUNK + 1, 3 * CHUNK - 5])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_rows_match_torch(vocab, batch, dtype):
    torch.manual_seed(vocab * 10 + batch)
    logits = torch.randn(batch, vocab, device=DEVICE).to(dtype)
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_ties_across_chunks_take_the_first_index():
    logits = torch.zeros(2, 3 * CHUNK + 11, device=DEVICE)
    logits[0, [CHUNK + 5, 5, 2 * CHUNK]] = 3.0  # the first one is in chunk 0
    logits[1, [3 * CHUNK + 2, 2 * CHUNK + 9]] = 3.0
    assert argmax_rows(logits).tolist() == [5, 2 * CHUNK + 9] == logits.argmax(dim=-1).tolist()


def test_nan_wins_and_the_first_nan_is_taken_as_torch_does():
    logits = torch.randn(3, 2 * CHUNK + 3, device=DEVICE)
    logits[0, [CHUNK + 7, 2 * CHUNK + 1]] = float("nan")
    logits[0, 3] = float("inf")
    logits[1, 2 * CHUNK + 2] = float("nan")  # in the last chunk (3 logits)
    logits[2, 9] = float("inf")
    assert argmax_rows(logits).tolist() == [CHUNK + 7, 2 * CHUNK + 2, 9] == logits.argmax(dim=-1).tolist()


def test_all_minus_infinity_gives_index_zero():
    logits = torch.full((2, CHUNK + 17), float("-inf"), device=DEVICE)
    assert argmax_rows(logits).tolist() == [0, 0] == logits.argmax(dim=-1).tolist()


def test_strided_rows_and_the_last_position_of_three_d_logits():
    logits = torch.randn(2, 5, 2 * CHUNK - 1, device=DEVICE)
    last = logits[:, -1]  # rows 5 * V apart: read in place
    assert torch.equal(argmax_rows(last), last.argmax(dim=-1))
    columns = torch.randn(CHUNK + 3, 2, device=DEVICE).t()  # stride(1) == 2: copied first
    assert torch.equal(argmax_rows(columns), columns.argmax(dim=-1))


def test_an_empty_batch_gives_no_tokens():
    assert argmax_rows(torch.zeros(0, 10, device=DEVICE)).shape == (0,)


@pytest.mark.parametrize(
    "logits, message",
    [
        (torch.zeros(10), r"\[batch, vocab\] logits, vocab >= 1; got \(10,\)"),
        (torch.zeros(2, 0), r"vocab >= 1; got \(2, 0\)"),
        (torch.zeros(2, 3, dtype=torch.int64), "logits, got torch.int64"),
    ],
)
def test_bad_logits_are_refused(logits, message):
    with pytest.raises(ValueError, match=message):
        argmax_rows(logits.to(DEVICE))
