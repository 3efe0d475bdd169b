import pytest
import torch

from clipguard.data.classes import ClassInfo
from clipguard.evaluation.linear_probe import LinearProbe
from clipguard.evaluation.retrieval import recall_at_k
from clipguard.evaluation.zeroshot import mean_per_class_recall, topk_accuracy, zeroshot_classifier


class OneHotText(torch.nn.Module):
    """encode_text returns the one-hot of the first token after <start>: exact, hand-built features."""

    def encode_text(self, tokens, normalize=True):
        f = torch.nn.functional.one_hot(tokens[:, 1] % 8, 8).float()
        return f


def test_zeroshot_classifier_is_template_mean():
    info = ClassInfo(classes=["a", "b"], templates=["{}", "x {}"])
    tok = lambda texts: torch.tensor([[0, 1 if t.endswith("a") else 2] for t in texts])  # noqa: E731
    clf = zeroshot_classifier(OneHotText(), tok, info, "cpu")
    assert torch.allclose(clf[0], torch.nn.functional.one_hot(torch.tensor(1), 8).float())
    assert torch.allclose(clf[1].norm(), torch.tensor(1.0))


def test_topk_accuracy_exact():
    clf = torch.eye(4)
    feats = torch.tensor([[1.0, 0.5, 0, 0], [0.2, 1.0, 0.5, 0], [0, 0, 0.3, 1.0]])
    labels = torch.tensor([0, 2, 2])
    acc = topk_accuracy(feats, labels, clf, (1, 2, 5))
    assert acc["acc1"] == pytest.approx(1 / 3) and acc["acc2"] == 1.0 and "acc5" not in acc
    # class 0: 1/1 right; class 2: 0/2 right -> balanced 0.5
    assert mean_per_class_recall(feats, labels, clf) == pytest.approx(0.5)


def test_retrieval_recall():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0.5, 1.0], [0, 1.0, 0.3]])  # no ties
    r = recall_at_k(img, txt, (1, 2))
    assert r["text_retrieval_recall@1"] == pytest.approx(1 / 3) and r["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert r["text_retrieval_recall@2"] == 1.0


def test_linear_probe_separable():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 4, generator=g) + 3, torch.randn(50, 4, generator=g) - 3])
    y = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    p = LinearProbe().fit(x, y)
    assert p.score(x, y, (1,))["acc1"] == 1.0
    assert p.topk(x[:2], 2).shape == (2, 2)


def test_encode_tokens_encodes_a_repeated_caption_once(fm_train):
    """Repeated captions reach the text tower once; every row gets its own caption's features, as
    encoding each caption alone gives them (the same bits on a CPU, to rounding anywhere)."""
    from clipguard.evaluation.features import encode_tokens
    from clipguard.models.factory import create_model, get_tokenizer

    model = create_model("cg-tiny")
    model = model[0] if isinstance(model, tuple) else model
    captions = list(fm_train.captions[:40])
    tokens = get_tokenizer("cg-tiny")(captions + captions[:25] + captions[5:6] * 7)
    seen: list[int] = []
    encode_text = model.encode_text

    def counting(t, normalize=False):
        seen.append(len(t))
        return encode_text(t, normalize=normalize)

    model.encode_text = counting
    got = encode_tokens(model, tokens, "cpu", batch_size=16)
    assert sum(seen) == len(torch.unique(tokens, dim=0)) < len(tokens)
    alone = torch.cat([encode_text(tokens[i:i + 1], normalize=True) for i in range(len(tokens))])
    assert got.shape == alone.shape and torch.allclose(got, alone, atol=1e-6, rtol=0)
    assert model.training  # left as it was found
    model.encode_text = encode_text
    assert encode_tokens(model, tokens[:0], "cpu").numel() == 0
