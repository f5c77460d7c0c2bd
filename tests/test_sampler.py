"""The batched sampler on hand-made logits: filters, seeds, distribution, logprobs."""
import pytest
import torch

from quantrt.engine.sampler import Sampler, filter_logits
from quantrt.engine.sequence import SamplingParams, Sequence
from quantrt.errors import ConfigError

VOCAB = 37


def seqs_for(*params, output_ids=()):
    return [Sequence([1, 2, 3], p, output_ids=list(output_ids)) for p in params]


def logits(rows, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def filter_one(row, top_k, top_p, min_p):
    """Row-at-a-time statement of the rules, to check the batched version against."""
    row = row.clone()
    if 0 < top_k < row.numel():
        row[row < row.topk(top_k).values[-1]] = float("-inf")
    if min_p > 0:
        p = row.softmax(-1)
        row[p < min_p * p.max()] = float("-inf")
    if top_p < 1:
        order = row.argsort(descending=True)
        p = row[order].softmax(-1)
        mass_before = p.cumsum(-1) - p
        row[order[mass_before >= top_p]] = float("-inf")
    return row


SETTINGS = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.63, 0.0), (0, 1.0, 0.2), (7, 0.81, 0.05),
            (-1, 0.3, 0.0), (1, 1.0, 0.0), (VOCAB, 0.97, 0.0)]


def test_batched_filters_equal_row_by_row_rules():
    x = logits(len(SETTINGS))
    got = filter_logits(x, *map(list, zip(*SETTINGS)))
    for i, (k, p, m) in enumerate(SETTINGS):
        assert torch.equal(got[i], filter_one(x[i], k, p, m)), SETTINGS[i]
    assert torch.equal(got[0], x[0])  # disabled settings change nothing


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    x = logits(3, seed=1)
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=1, seed=5),
          SamplingParams(temperature=0.7, top_p=1e-6)]
    tokens, lps = Sampler()(x, seqs_for(*ps))
    assert tokens == x.argmax(-1).tolist() and lps == [None] * 3


def test_seeded_rows_do_not_depend_on_their_batch():
    x = logits(4, seed=2)
    x[1:] = x[0]
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler()(x[:1], seqs_for(p))[0][0] for _ in range(2)]
    s = Sampler()
    crowd = seqs_for(SamplingParams(temperature=0.5), p, SamplingParams(temperature=2.0, seed=9),
                     SamplingParams(temperature=1.0))
    assert s(x, crowd)[0][1] == alone[0] == alone[1]


def test_seeded_generator_advances_per_sequence():
    x = logits(1, seed=3).repeat(1, 1)
    s = Sampler()
    seq = seqs_for(SamplingParams(temperature=1.0, seed=7))
    draws = [s(x, seq)[0][0] for _ in range(12)]
    assert len(set(draws)) > 1          # a fresh generator per call would repeat one token
    s.forget(seq[0])
    assert [s(x, seq)[0][0] for _ in range(12)] == draws


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.6, 3)])
def test_samples_follow_the_processed_distribution(temperature, top_k):
    x = logits(1, seed=4)[:, :6]
    rows = 6000
    # Half the rows seeded (one seed each), half from the global generator (seeded here).
    seqs = [Sequence([1], SamplingParams(temperature=temperature, top_k=top_k,
                                         seed=i if i % 2 else None)) for i in range(rows)]
    torch.manual_seed(0)
    tokens, _ = Sampler()(x.repeat(rows, 1), seqs)
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float() / rows
    expected = filter_logits(x / temperature, [top_k], [1.0], [0.0]).softmax(-1)[0]
    assert (counts - expected).abs().max() < 0.03
    if top_k:
        assert set(tokens) <= set(x[0].topk(top_k).indices.tolist())


def test_logprobs_are_raw_log_softmax_whatever_the_sampling():
    x = logits(3, seed=5)
    ps = [SamplingParams(temperature=0.5, top_k=4, seed=1, logprobs=3),
          SamplingParams(temperature=0, repetition_penalty=1.7, logprobs=0),
          SamplingParams(temperature=1.0)]
    tokens, lps = Sampler()(x.clone(), seqs_for(*ps, output_ids=[4, 5]))
    ref = x.log_softmax(-1)
    for row in (0, 1):
        lp = lps[row]
        assert lp.token_id == tokens[row]
        assert lp.logprob == pytest.approx(ref[row, tokens[row]].item(), abs=1e-5)
        assert lp.rank == int((ref[row] > ref[row, tokens[row]]).sum()) + 1
    assert [t for t, _ in lps[0].top] == ref[0].topk(3).indices.tolist()
    assert [v for _, v in lps[0].top] == pytest.approx(ref[0].topk(3).values.tolist(), abs=1e-5)
    assert lps[1].top == () and lps[2] is None
    assert set(lps[0].as_dict()) == {t for t, _ in lps[0].top} | {tokens[0]}


def test_penalties_change_the_choice_not_the_input():
    x = torch.zeros(1, VOCAB)
    x[0, 4] = 2.0
    x[0, 9] = 1.9
    before = x.clone()
    p = SamplingParams(temperature=0, frequency_penalty=0.5)
    tokens, _ = Sampler()(x, seqs_for(p, output_ids=[4]))
    assert tokens == [9] and torch.equal(x, before)


@pytest.mark.parametrize("kwargs", [
    {"n": 0}, {"n": 129}, {"n": 1.5}, {"logprobs": -1}, {"logprobs": 21}, {"logprobs": 2.0},
    {"max_tokens": 3.0}, {"top_k": True}, {"stop": [1]}, {"stop_token_ids": [-3]},
    {"temperature": "1"}, {"seed": 1.0},
])
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_lists_become_tuples():
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=[3], n=3, logprobs=20)
    assert p.stop == ("a", "bc") and p.stop_token_ids == (3,) and hash(p)
