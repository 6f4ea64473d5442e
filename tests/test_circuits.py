"""Edge attribution and exact circuit evaluation (splice.circuits): the full circuit is the clean
run and the empty one the corrupted run on every family; a single edge's exact ablation and its
EAP score equal hand-written computations with plain torch hooks (a head given its own input
copy); EAP-IG with one step is EAP; the norms found for each family are the hand-listed ones;
refusals come before any forward and leave no hook."""

import pytest
import torch
import transformers
from conftest import CharTokenizer, build, hook_total
from families import FAMILIES
from handhooks import hand_record, register

import splice
from splice import metrics
from splice.circuits import Circuit, ablate, edge_scores, evaluate, graph_of, threshold, top
from splice.circuits.inputs import feeds_of

PAIRS = [("abcdefg", "abcxefg"), ("bcdefgh", "bcdyfgh"), ("cdefg", "cdzfg"), ("defghij", "dxfghij")]
DATA = [{"prompt": corrupt, "clean": clean, "correct": "h", "wrong": "b"} for clean, corrupt in PAIRS]
EVEN = DATA[:2] + DATA[3:]  # one length: no padding, for by-hand references
METRIC = metrics.logit_diff()
SUPPORTED = sorted(f for f in FAMILIES if f != "gemma2")
HAND = ["gpt2", "llama", "gpt_neox", "falcon"]  # sequential, GQA, parallel, multi-query parallel


SHARP = 16.0  # weight scale at which tiny random models attend unevenly and edges matter


@pytest.fixture(scope="module")
def models():
    """`get(family, sharp=False)`: one shared model per family; `sharp` multiplies every weight
    matrix by SHARP, so that single edges have effects well above float32 rounding (at the usual
    init a query edge of a 3-layer random model moves the logits by ~1e-5)."""
    cache = {}

    def get(family, sharp=False):
        if (family, sharp) not in cache:
            hf = build(family)
            if sharp:
                with torch.no_grad():
                    for p in hf.parameters():
                        if p.dim() >= 2:
                            p.mul_(SHARP)
            cache[(family, sharp)] = splice.Model(hf, CharTokenizer())
        return cache[(family, sharp)]

    return get


def _all_edges(model):
    return Circuit(frozenset((s, r.name) for s, r in graph_of(model).edges()))


def _ids(model, field):
    return torch.stack([model.to_tokens(d[field])[0] for d in EVEN])


def _logit_diff(model, logits):
    a, b = model.to_single_token("h"), model.to_single_token("b")
    return logits[:, -1, a] - logits[:, -1, b]


def _head_delta(model, family, layer, head):
    """Head `head` of `layer`: clean minus corrupted output in the residual stream, by hand
    (its z slice through the output projection, minus the projection of zeros: the bias)."""
    spec = FAMILIES[family]
    out_proj, _ = spec.hand_module(model.hf, "attn.z", layer)

    def result(ids):
        z = hand_record(model.hf, family, f"blocks.{layer}.attn.z", ids)
        only = torch.zeros_like(z)
        only[:, :, head] = z[:, :, head]
        with torch.no_grad():
            return out_proj(only.flatten(-2)) - out_proj(torch.zeros_like(only.flatten(-2)))

    return result(_ids(model, "clean")) - result(_ids(model, "prompt"))


def _own_input_run(model, family, layer, point, head, x, grad):
    """The clean run's mean logit difference with head `head`'s `point` input (q, or a k/v head)
    computed from its own residual input `x` (through the family's hand-listed norm and module)."""
    spec = FAMILIES[family]
    norm = spec.norms(model.hf, layer)[0]
    module, _ = spec.hand_module(model.hf, f"attn.{point}", layer)
    read, _ = spec.hand_heads(model.hf, f"attn.{point}")

    with torch.set_grad_enabled(grad):
        own = read(module(norm(x)))[:, :, head]  # before the hook: the module is called outside the run

    def feed(t):
        t = t.clone()
        t[:, :, head] = own
        return t

    handle = register(model.hf, family, f"blocks.{layer}.attn.{point}", feed)
    try:
        with torch.set_grad_enabled(grad):
            return _logit_diff(model, model.hf(_ids(model, "clean")).logits).mean()
    finally:
        handle.remove()


@pytest.mark.parametrize("family", SUPPORTED)
def test_full_circuit_is_clean_and_empty_is_corrupt(models, family):
    model = models(family)
    full = evaluate(model, DATA, _all_edges(model), METRIC)
    empty = evaluate(model, DATA, [], METRIC)
    assert full["circuit"] == pytest.approx(full["clean"], abs=1e-5)
    assert empty["circuit"] == pytest.approx(empty["corrupt"], abs=1e-5)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert abs(full["clean"] - full["corrupt"]) > 1e-4  # the test sees a difference
    assert model.hook_count == 0 and hook_total(model.hf) == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_norms_found_are_the_hand_listed_ones(models, family):
    model = models(family)
    if family == "gemma2":
        with pytest.raises(splice.SpliceError, match="sum of the nodes' outputs"):
            feeds_of(model)
        return
    feeds = feeds_of(model)
    for layer in range(model.dims.n_layers):
        attn, mlp = FAMILIES[family].norms(model.hf, layer)
        assert model.layout.module_at(feeds.attn_norm.replace("{l}", str(layer))) is attn
        assert model.layout.module_at(feeds.mlp_norm.replace("{l}", str(layer))) is mlp


def test_falcon_with_separate_attention_and_mlp_norms():
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=4, vocab_size=97, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = splice.Model(transformers.FalconForCausalLM(config).eval(), CharTokenizer())
    feeds = feeds_of(model)
    assert (feeds.attn_norm, feeds.mlp_norm) == ("transformer.h.{l}.ln_attn", "transformer.h.{l}.ln_mlp")
    full, empty = evaluate(model, DATA, _all_edges(model), METRIC), evaluate(model, DATA, [], METRIC)
    assert full["circuit"] == pytest.approx(full["clean"], abs=1e-5)
    assert empty["circuit"] == pytest.approx(empty["corrupt"], abs=1e-5)


@pytest.mark.parametrize("family", HAND)
@pytest.mark.parametrize("point", ["q", "k"])
def test_single_edge_ablation_and_eap_score_equal_hand_computation(models, family, point):
    model = models(family, sharp=True)
    n_layers = model.dims.n_layers
    layer, head = n_layers - 1, 0
    sender = (1, 1)  # head 1 of layer 1
    edge = (f"blocks.{sender[0]}.attn.h{sender[1]}", f"blocks.{layer}.attn.{point}.h{head}")
    delta = _head_delta(model, family, *sender)
    x_clean = hand_record(model.hf, family, f"blocks.{layer}.resid_pre", _ids(model, "clean"))
    x_corrupt = hand_record(model.hf, family, f"blocks.{layer}.resid_pre", _ids(model, "prompt"))

    # exact ablation: the receiver's input loses the sender's clean-minus-corrupted output
    with torch.no_grad():
        by_hand = float(_own_input_run(model, family, layer, point, head, x_clean - delta, grad=False))
    cut = ablate(model, EVEN, [edge], METRIC)
    assert cut["circuit"] == pytest.approx(by_hand, rel=1e-5, abs=1e-5)
    assert abs(cut["effect"]) > 1e-3  # the edge matters: the comparison is not clean == clean
    print(f"{family} {edge}: effect {cut['effect']:.3g}", end=" ")

    # EAP: the gradient at the head's own input copy, by hand
    x = x_clean.clone().requires_grad_(True)
    value = _own_input_run(model, family, layer, point, head, x, grad=True)
    (grad,) = torch.autograd.grad(value * len(EVEN), x)  # per prompt: d metric_b / d x_b
    n = len(EVEN)
    scores = edge_scores(model, EVEN, METRIC).set_index(["source", "target"]).score
    assert scores[edge] == pytest.approx(float((delta * grad).sum() / n), rel=1e-5, abs=1e-5)
    print(f"score {scores[edge]:.3g}")
    # the edges into one receiver sum to (its clean - corrupted input) . gradient
    into = scores.xs(edge[1], level="target").sum()
    assert into == pytest.approx(float(((x_clean - x_corrupt) * grad).sum() / n), rel=1e-5, abs=1e-5)
    assert model.hook_count == 0 and hook_total(model.hf) == 0


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_eap_ig_with_one_step_is_eap(models, family):
    model = models(family)
    eap = edge_scores(model, DATA, METRIC)
    ig = edge_scores(model, DATA, METRIC, method="eap-ig", steps=1)
    assert torch.equal(torch.tensor(eap.score.values), torch.tensor(ig.score.values))
    assert all(p.grad is None for p in model.hf.parameters())  # torch.autograd.grad only
    batched = edge_scores(model, DATA, METRIC, method="eap-ig", steps=3, max_rows=4 * 3)
    split = edge_scores(model, DATA, METRIC, method="eap-ig", steps=3, max_rows=4)
    assert torch.allclose(torch.tensor(batched.score.values), torch.tensor(split.score.values), atol=1e-6)


def test_receivers_edges_and_names(models):
    model = models("llama")  # 6 query heads, 2 key/value heads, 3 layers
    g = graph_of(model)
    assert [r.name for r in g.receivers[:8]] == [f"blocks.0.attn.q.h{h}" for h in range(6)] + [
        "blocks.0.attn.k.h0",
        "blocks.0.attn.k.h1",
    ]
    scores = edge_scores(model, DATA, METRIC)
    assert set(scores.input) == {"q", "k", "v", "mlp", "logits"}
    assert len(scores) == sum(r.upstream for r in g.receivers)
    assert g.receiver("blocks.1.mlp.in").upstream == 1 + 7 + 6  # embed, layer 0, layer 1's heads
    parallel = graph_of(models("gpt_neox"))
    assert parallel.receiver("blocks.1.mlp.in").upstream == parallel.receiver("blocks.1.attn.q.h0").upstream
    circuit = Circuit(frozenset({("blocks.0.attn.h1", "blocks.1.attn.k.h1")}), group=3)
    assert circuit.fed_by("blocks.1.attn.k.h1") == (
        "blocks.1.attn.h3",
        "blocks.1.attn.h4",
        "blocks.1.attn.h5",
    )


def test_top_threshold_and_pruning_keep_the_evaluation(models):
    model = models("gpt2")
    scores = edge_scores(model, DATA, METRIC)
    raw, pruned = top(scores, 20, prune=False), top(scores, 20)
    assert len(raw) == 20 and pruned.edges <= raw.edges
    assert all(
        abs(scores.score).nlargest(20).min() <= abs(s)
        for s in scores.set_index(["source", "target"]).score[list(raw.edges)]
    )
    a, b = evaluate(model, DATA, raw, METRIC), evaluate(model, DATA, pruned, METRIC)
    assert a["circuit"] == pytest.approx(b["circuit"], abs=1e-5)
    cut = float(abs(scores.score).nlargest(10).min())
    assert len(threshold(scores, cut, prune=False)) == 10
    frame = pruned.to_frame(scores)
    assert list(frame.columns[:2]) == ["source", "target"] and len(frame) == len(pruned)
    assert "logits" in pruned.nodes or len(pruned) == 0


def _spearman(a, b):
    ra, rb = torch.tensor(a).argsort().argsort().double(), torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_scores_rank_like_exact_single_edge_ablation(models):
    """Spearman between -exact effect and the EAP / EAP-IG scores over every edge into layer 2's
    and the logits' receivers of a tiny random GPT-2 with sharpened weights (an honest floor:
    the measured values are printed)."""
    model = models("gpt2", sharp=True)
    eap = edge_scores(model, DATA, METRIC).set_index(["source", "target"]).score
    ig = edge_scores(model, DATA, METRIC, method="eap-ig", steps=5).set_index(["source", "target"]).score
    edges = [e for e in eap.index if e[1] == "logits" or e[1].startswith("blocks.2.")][::3]
    exact = [-ablate(model, DATA, [e], METRIC)["effect"] for e in edges]
    rho_eap, rho_ig = _spearman(exact, [eap[e] for e in edges]), _spearman(exact, [ig[e] for e in edges])
    print(f"spearman over {len(edges)} edges: EAP {rho_eap:.3f}, EAP-IG {rho_ig:.3f}")
    assert rho_eap > 0.5 and rho_ig > 0.5


def test_refusals_come_before_any_forward(models):
    model = splice.Model(build("gpt2"), CharTokenizer())
    calls = []
    handle = model.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        cases = [
            (lambda: evaluate(model, DATA, [("blocks.9.mlp", "logits")], METRIC), "unknown source node"),
            (lambda: evaluate(model, DATA, [("embed", "blocks.0.attn.q.h7")], METRIC), "unknown receiver"),
            (lambda: evaluate(model, DATA, [("blocks.1.mlp", "blocks.0.attn.q.h0")], METRIC), "not an edge"),
            (lambda: evaluate(model, DATA, [("blocks.0.mlp",)], METRIC), "pair"),
            (lambda: evaluate(model, [], [], METRIC), "at least one prompt"),
            (lambda: evaluate(model, DATA, [], None), "one metric"),
            (lambda: edge_scores(model, DATA, METRIC, method="acdc"), "method"),
            (lambda: edge_scores(model, DATA, METRIC, method="eap-ig", steps=0), "steps"),
            (lambda: edge_scores(model, DATA, METRIC, source="nope"), "nope"),
            (lambda: edge_scores(model, [{"prompt": "abc", "clean": "abcd"}], METRIC), "as many tokens"),
            (lambda: ablate(model, DATA, [("embed", "logit")], METRIC), "unknown receiver"),
        ]
        for call, message in cases:
            with pytest.raises(splice.SpliceError, match=message):
                call()
        scores = edge_scores(model, DATA, METRIC)
        calls.clear()
        for k in (0, -1, 2.5):
            with pytest.raises(splice.SpliceError, match="positive"):
                top(scores, k)
        with pytest.raises(splice.SpliceError, match="columns"):
            top(scores.drop(columns="score"), 3)
        with pytest.raises(splice.SpliceError, match=">= 0"):
            threshold(scores, -1.0)
        assert calls == []
    finally:
        handle.remove()


def test_gemma2_is_refused_and_no_hook_is_left(models):
    model = models("gemma2")
    for call in (lambda: edge_scores(model, DATA, METRIC), lambda: evaluate(model, DATA, [], METRIC)):
        with pytest.raises(splice.SpliceError, match="normalise a sublayer's output"):
            call()
        assert model.hook_count == 0 and hook_total(model.hf) == 0


def test_no_hooks_left_after_an_exception(models):
    model = models("llama")

    def failing(logits, baseline, batch):
        if logits.requires_grad or logits.shape[0] > 0:
            raise RuntimeError("metric failed")

    bad = metrics.custom(failing, name="fails")
    for call in (lambda: edge_scores(model, DATA, bad), lambda: evaluate(model, DATA, [], bad)):
        with pytest.raises(RuntimeError, match="metric failed"):
            call()
        assert model.hook_count == 0 and hook_total(model.hf) == 0


def test_the_norm_cache_does_not_keep_a_model_alive():
    import gc
    import weakref

    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    m = splice.Model(hf)
    data = [{"input_ids": [5, 6, 7, 8], "clean": [5, 9, 7, 8], "correct": 3, "wrong": 4}]
    first = edge_scores(m, data, metrics.logit_diff())
    assert first.equals(edge_scores(m, data, metrics.logit_diff()))  # cached norms, same scores
    alive = weakref.ref(hf)
    del m, hf
    gc.collect()
    assert alive() is None
