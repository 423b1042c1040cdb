"""SAID aligner on a tiny random LLM: masks, loss placement, freezing, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from core.settings import AlignSettings, RefineSettings
from models import llm
from models.aligner import (
    AlignerConfig,
    FreshRows,
    FrozenLM,
    ItemAligner,
    Prefix,
    alignment_loss,
    build_inputs,
    estimate_rows,
    fit_text_to_rows,
    greedy_reconstruct,
    pad_batch,
    text_init_rows,
    text_loss,
    tokenize_texts,
)
from models.llm import autocast
from tests.support.tiny import CharTokenizer, tiny_llm
from training.align import _pass_members, fidelity, refine_fresh, train_full

TITLES = [
    "rose lip balm",
    "argan oil shampoo 250ml",
    "matte lipstick red",
    "nail file",
    "vitamin c serum",
    "eye shadow palette nude",
    "hair clip",
    "sun cream spf 50",
]
CPU = torch.device("cpu")


def setup(k: int = 2):
    tok, llm = CharTokenizer(), tiny_llm()
    tokens = tokenize_texts(tok, TITLES)
    aligner = ItemAligner(AlignerConfig(n_items=len(TITLES), hidden=32, item_dim=16, k=k))
    return tok, FrozenLM(llm, tok, CPU, Prefix(tok, " Item text:")), tokens, aligner


def test_shapes_and_padding_mask():
    tok, lm, tokens, aligner = setup(k=3)
    llm, prefix = lm.model, lm.prefix
    text = pad_batch(tokens[:3], tok.pad_token_id)
    soft = aligner.soft_tokens(torch.tensor([1, 2, 3]))
    assert soft.shape == (3, 3, 32)
    inputs, attn = build_inputs(llm, prefix, soft, text)
    P = prefix.length(3)
    assert inputs.shape == (3, P + text.ids.shape[1], 32)
    assert attn[:, :P].all() and torch.equal(attn[:, P:].bool(), text.mask)
    assert tokens[0][-1] == tok.eos_token_id


def test_loss_counts_only_text_tokens_and_ignores_padding():
    tok, lm, tokens, aligner = setup()
    soft = aligner.soft_tokens(torch.tensor([1, 5]))
    alone, _, _ = alignment_loss(lm, soft[:1], pad_batch([tokens[0]], 2))
    # the same item next to a much longer one: extra padding must not change its loss
    both, _, _ = alignment_loss(lm, soft, pad_batch([tokens[0], tokens[5]], 2))
    assert torch.allclose(alone[0], both[0], atol=1e-5)
    # changing the prompt token ids changes nothing the loss is computed on directly, but a
    # corrupted text target does change it
    wrong = [t[:] for t in tokens[:1]]
    wrong[0][0] = (wrong[0][0] + 1) % 90 + 3
    changed, _, _ = alignment_loss(lm, soft[:1], pad_batch(wrong, 2))
    assert not torch.allclose(alone, changed)


def test_the_text_loss_is_the_mean_over_real_tokens_whatever_the_padding():
    """``text_loss`` scores every position and masks padding out (so the compiler can fuse
    it); it must equal cross-entropy and accuracy over the real tokens alone, per item and
    over the batch (each token weighs the same, so long texts weigh more)."""
    torch.manual_seed(0)
    weight, h = torch.randn(50, 8), torch.randn(3, 6, 8)  # (V, H), (B, L, H)
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    best = (h @ weight.T).argmax(-1)  # (B, L) the head's own choice at each position
    ids[~mask] = best[~mask]  # padding the head gets right: counted, it would lift accuracy
    ids[:, 0] = best[:, 0]  # and one real token right per item, so accuracy is not 0 anyway
    per_item, acc, mean = text_loss(weight, h, ids, mask)
    for b in range(3):
        logits = h[b][mask[b]] @ weight.T  # (n_b, V)
        ce = F.cross_entropy(logits, ids[b][mask[b]], reduction="none")
        assert per_item[b].item() == pytest.approx(ce.mean().item(), rel=1e-5)
        assert acc[b].item() == pytest.approx((logits.argmax(-1) == ids[b][mask[b]]).float().mean().item())
    assert 0 < acc[1].item() < 1  # 1 of its 2 real tokens; counting padding would give 5 of 6
    every = F.cross_entropy(h[mask] @ weight.T, ids[mask], reduction="none")  # (9,)
    assert mean.item() == pytest.approx(every.mean().item(), rel=1e-5)
    assert mean.item() != pytest.approx(per_item.mean().item(), rel=1e-3)  # token-weighted, not item-weighted


def test_full_alignment_lowers_loss_and_resumes_from_checkpoint(tmp_path):
    tok, lm, tokens, aligner = setup()
    idx = list(range(1, len(TITLES) + 1))
    cfg = AlignSettings(epochs=4, batch_size=4, lr_rows=0.1, lr_proj=1e-2, checkpoint_every_s=0)
    ckpt = tmp_path / "align.pt"
    hist = train_full(aligner, lm, tokens, idx, cfg, ckpt, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # a rerun with more epochs resumes at epoch 4, not from scratch
    resumed = ItemAligner(aligner.cfg)
    cfg = cfg.model_copy(update={"epochs": 5})
    hist2 = train_full(resumed, lm, tokens, idx, cfg, ckpt, progress=False)
    assert len(hist2) == 5 and hist2[:4] == hist
    assert hist2[-1]["trained"] == len(TITLES)


def test_a_compiled_alignment_runs_the_same_steps_through_torch_compile(monkeypatch):
    """``SAID_ALIGN_COMPILE``: the training steps run the LLM's transformer and the head's
    loss (``text_loss``) through ``torch.compile`` (each compiled once, both run), and
    compute what the eager steps do, to rounding. A counting backend (``aot_eager``:
    autograd through the graph, no code generation) shows compiled graphs are what runs,
    and keeps the test fast; a call count shows the compiled loss is the one called."""
    from torch._dynamo.testing import CompileCounterWithBackend

    compiled, counter, loss_calls = [], CompileCounterWithBackend("aot_eager"), [0]
    real_compile = torch.compile

    def counting_compile(module, **kw):
        compiled.append(module)
        fast = real_compile(module, backend=counter, **kw)
        if module is not text_loss:
            return fast

        def counted(*args):
            loss_calls[0] += 1
            return fast(*args)

        return counted

    monkeypatch.setattr(torch, "compile", counting_compile)
    tok, lm, tokens, aligner = setup()
    twin = copy.deepcopy(aligner)
    idx = list(range(1, len(TITLES) + 1))
    cfg = AlignSettings(epochs=2, batch_size=4, lr_rows=0.1, lr_proj=1e-2, acc_bar=1.01)
    eager = train_full(aligner, lm, tokens, idx, cfg, progress=False)
    assert compiled == []
    fast = train_full(twin, lm, tokens, idx, cfg.model_copy(update={"compile": True}), progress=False)
    assert len(compiled) == 2 and compiled[0] is lm.model.model and compiled[1] is text_loss
    assert counter.frame_count >= 2  # the steps ran the compiled graphs, not the eager code
    assert loss_calls[0] == 2 * 2  # 2 passes of 2 batches of 4 items: every step's loss
    assert lm.body is None and lm.head_loss is None  # the caller's LLM is left as it was
    for a, b in zip(eager, fast, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for p, q in zip(aligner.parameters(), twin.parameters(), strict=True):
        # Adam and Adagrad scale each step by the gradient's own size, so rounding moves
        # parameters by well under 1% of their norm over these 4 steps
        assert ((p - q).norm() / p.norm()).item() < 5e-3


def test_a_checkpoint_of_other_alignment_code_is_not_resumed(tmp_path, monkeypatch):
    from training import align

    tok, lm, tokens, aligner = setup()
    idx = list(range(1, len(TITLES) + 1))
    cfg = AlignSettings(epochs=2, batch_size=4, checkpoint_every_s=0)
    ckpt = tmp_path / "align.pt"
    first = train_full(aligner, lm, tokens, idx, cfg, ckpt, progress=False)
    monkeypatch.setattr(align, "code_version", lambda: "newer-code")
    again = train_full(ItemAligner(aligner.cfg), lm, tokens, idx, cfg.model_copy(update={"epochs": 3}), ckpt)
    assert len(again) == 3 and again[:2] != first, "started afresh, not resumed at pass 3"


def test_fresh_rows_leave_old_rows_and_projector_bit_identical():
    tok, lm, tokens, aligner = setup()
    before_rows = aligner.items.weight.detach().clone()
    before_proj = {k: v.clone() for k, v in aligner.projector.state_dict().items()}
    fresh = FreshRows(aligner.projector, torch.randn(3, 16))
    start = fresh.rows.detach().clone()
    cfg = AlignSettings(refine=RefineSettings(max_passes=5, lr=0.1, batch=2))
    hist = refine_fresh(fresh, lm, tokens[:3], cfg, target_accuracy=None)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert not torch.equal(fresh.rows, start), "fresh rows were trained"
    assert torch.equal(aligner.items.weight, before_rows)
    for key, value in aligner.projector.state_dict().items():
        assert torch.equal(value, before_proj[key])


def test_greedy_reconstruct_stops_at_eos():
    tok, lm, tokens, aligner = setup()
    llm, prefix = lm.model, lm.prefix
    out = greedy_reconstruct(llm, prefix, aligner.soft_tokens(torch.tensor([1, 2])), 10, 2)
    assert len(out) == 2 and all(len(o) <= 10 for o in out)
    assert all(2 not in o[:-1] for o in out)


def test_ridge_estimator_recovers_a_linear_map():
    torch.manual_seed(0)
    feats = torch.randn(200, 12)
    true_w = torch.randn(13, 5)
    rows = torch.cat([feats, torch.ones(200, 1)], 1) @ true_w
    w = fit_text_to_rows(feats, rows, l2=1e-6)
    assert torch.allclose(estimate_rows(feats, w), rows, atol=1e-3)


def test_fidelity_counts_exact_rebuilds_and_token_accuracy():
    # Make the targets what greedy decoding produces: then every item is rebuilt exactly
    # and teacher forcing predicts every token; one wrong token breaks exactly one item.
    tok, lm, _, aligner = setup()
    llm, prefix = lm.model, lm.prefix
    keys = [1, 2, 3, 4]
    with autocast(CPU):  # as fidelity decodes
        targets = greedy_reconstruct(
            llm, prefix, aligner.soft_tokens(torch.tensor(keys)), 10, tok.eos_token_id
        )
    fid = fidelity(aligner.soft_tokens, lm, targets, keys, batch_size=4)
    assert fid["exact_match"] == 1.0 and fid["token_accuracy"] == [1.0] * 4
    broken = [t[:] for t in targets]
    broken[2][-1] = 3 if broken[2][-1] != 3 else 4  # the last: the context of no other token
    fid2 = fidelity(aligner.soft_tokens, lm, broken, keys, batch_size=4)
    assert fid2["exact_match"] == 0.75
    assert fid2["token_accuracy"] == pytest.approx([1.0, 1.0, 1 - 1 / len(broken[2]), 1.0])


def test_pass_members_skip_converged_items_and_recheck_them():
    cfg = AlignSettings(recheck_every=3)
    state = {"epoch": 0, "converged": [True, False, True, False]}
    assert _pass_members(state, 4, cfg) == [1, 3]
    state["epoch"] = 2  # the third pass re-checks every item
    assert _pass_members(state, 4, cfg) == [0, 1, 2, 3]
    state.update(epoch=4, converged=[True] * 4)  # all converged: a re-check pass
    assert _pass_members(state, 4, cfg) == [0, 1, 2, 3]


def test_alignment_ends_once_a_recheck_finds_every_item_at_the_bar():
    tok, lm, tokens, aligner = setup()
    idx = list(range(1, len(TITLES) + 1))
    cfg = AlignSettings(epochs=6, batch_size=4, acc_bar=0.0)
    done = train_full(aligner, lm, tokens, idx, cfg, progress=False)
    assert [h["trained"] for h in done] == [len(TITLES)], "every item met the bar in pass 1"
    never = train_full(
        aligner, lm, tokens, idx, AlignSettings(epochs=3, batch_size=4, acc_bar=1.01), progress=False
    )
    assert [h["trained"] for h in never] == [len(TITLES)] * 3


def test_fresh_refinement_stops_at_the_target_accuracy():
    tok, lm, tokens, aligner = setup()
    fresh = FreshRows(aligner.projector, torch.randn(4, 16))
    cfg = AlignSettings(refine=RefineSettings(max_passes=5, batch=2))
    hist = refine_fresh(fresh, lm, tokens[:4], cfg, target_accuracy=0.0)
    assert [h["trained"] for h in hist] == [4]
    cfg = AlignSettings(refine=RefineSettings(max_passes=3, batch=2))
    hist = refine_fresh(fresh, lm, tokens[:4], cfg, target_accuracy=1.01)
    assert [h["trained"] for h in hist] == [4, 4, 4]


def test_text_init_rows_keep_similar_texts_close():
    torch.manual_seed(0)
    base = torch.randn(3, 40)
    feats = torch.cat([base + 0.01 * torch.randn(3, 40) for _ in range(4)])  # 4 near-copies each
    rows = text_init_rows(feats, 8)
    assert rows.shape == (12, 8) and abs(rows.std().item() - 1.0) < 1e-4
    d = torch.cdist(rows, rows)
    assert d[0, 3] < 0.1 * d[0, 1], "copies of one text start together, other texts apart"


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    tok, lm, tokens, aligner = setup()
    idx = list(range(1, len(TITLES) + 1))
    ckpt = tmp_path / "align.pt"
    train_full(aligner, lm, tokens, idx, AlignSettings(epochs=1, batch_size=4), ckpt, False)
    with pytest.raises(ValueError, match="lr_rows"):
        train_full(aligner, lm, tokens, idx, AlignSettings(epochs=2, batch_size=4, lr_rows=0.01), ckpt, False)


@pytest.mark.parametrize(
    ("machine", "avx512_bf16", "amx_bf16", "onednn", "native"),
    [
        ("x86_64", False, False, True, False),  # plain AVX512: oneDNN says yes, converting
        ("x86_64", True, False, True, True),
        ("x86_64", False, True, True, True),
        ("aarch64", False, False, True, True),  # oneDNN's check there is the ARM bf16 flag
        ("aarch64", False, False, False, False),
    ],
)
def test_cpu_autocast_is_bf16_only_where_bf16_is_native(
    monkeypatch, machine, avx512_bf16, amx_bf16, onednn, native
):
    """oneDNN's check says yes on plain AVX512 too, where bf16 is converted: 61 GFLOP/s
    against 266 in fp32 on one Xeon. Autocast follows the CPU's own bf16 units."""
    monkeypatch.setattr(llm.platform, "machine", lambda: machine)
    caps = {"avx512_bf16": avx512_bf16, "amx_bf16": amx_bf16}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    llm._cpu_bf16.cache_clear()
    try:
        assert llm.fast_bf16(torch.device("cpu")) is native
        with autocast(torch.device("cpu")):
            product = torch.ones(2, 2) @ torch.ones(2, 2)
        assert product.dtype == (torch.bfloat16 if native else torch.float32)
    finally:
        llm._cpu_bf16.cache_clear()
