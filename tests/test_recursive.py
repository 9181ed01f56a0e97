"""Recursive (looped) transformers on tiny models of every architecture: exactness of the loop
plan, connector, relaxed conversion, KV-cached generation, early exit, losses and checkpoints."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from depthkit.errors import DepthkitError
from depthkit.models.adapters import get_adapter
from depthkit.models.blockwise import block_context
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from depthkit.recursive import RecursiveModel, truncate_layers
from depthkit.recursive.config import RecursiveConfig
from depthkit.recursive.generate import decode_step, generate
from depthkit.recursive.loss import recursion_loss, step_losses, token_losses
from depthkit.recursive.relaxed import init_sources, relax, sharing_plan
from depthkit.recursive.train import RecursiveTrainSettings, train
from tests.conftest import interrupt_training

ATOL = 1e-5


def ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def looped_reference(base, order: list[int]) -> torch.Tensor:
    """Logits of the plain HF forward over a layer list that repeats shared modules.

    Without a cache: a repeated module keeps one layer_idx, so with HF's cache its second
    application would attend to the first one's keys (why the recursive model gives each step
    its own slots)."""
    adapter = get_adapter(base)
    decoder = adapter.decoder(base)
    original, types = decoder.layers, getattr(base.config, "layer_types", None)
    decoder.layers = nn.ModuleList([original[i] for i in order])
    base.config.num_hidden_layers = len(order)
    if types:
        base.config.layer_types = [types[i] for i in order]
    try:
        return base(ids(), use_cache=False).logits
    finally:
        decoder.layers = original
        base.config.num_hidden_layers = len(original)
        if types:
            base.config.layer_types = types


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("feedback", ["connector", "vanilla"])
def test_one_loop_equals_base(arch, feedback):
    base = tiny_model(arch)
    reference = base(ids()).logits
    model = RecursiveModel.wrap(base, num_loops=3, feedback=feedback)
    torch.testing.assert_close(model(ids(), num_loops=1).logits, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_connector_scale_zero_reruns_decoder_on_embeddings(arch):
    base = tiny_model(arch)
    reference = base(ids()).logits
    model = RecursiveModel.wrap(base, num_loops=2, residual="embeddings", scale_init=0.0)
    steps = model(ids(), num_loops=2, return_all_steps=True).step_logits
    assert len(steps) == 2
    torch.testing.assert_close(steps[1], reference, atol=ATOL, rtol=0)
    with torch.no_grad():
        model.connector.scale.fill_(0.5)
    moved = model(ids(), num_loops=2, return_all_steps=True).step_logits
    torch.testing.assert_close(moved[0], reference, atol=ATOL, rtol=0)
    assert (moved[1] - reference).abs().max() > 1e-3


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_vanilla_recursion_is_the_decoder_applied_twice(arch):
    base = tiny_model(arch)
    reference = looped_reference(base, [0, 1, 2, 3, 0, 1, 2, 3])
    model = RecursiveModel.wrap(base, feedback="vanilla")
    torch.testing.assert_close(model(ids(), num_loops=2).logits, reference, atol=ATOL, rtol=0)


def test_connector_samples_uniform_layers_and_checks_indices():
    model = RecursiveModel.wrap(tiny_model("llama", num_layers=8), connector_k=4)
    assert model.connector.positions == [1, 3, 5, 7]  # layers L/4, 2L/4, 3L/4, L (1-based)
    with pytest.raises(DepthkitError, match="out of range"):
        RecursiveModel.wrap(tiny_model("llama"), connector_layers=[0, 4])
    with pytest.raises(DepthkitError, match="connector_k"):
        RecursiveModel.wrap(tiny_model("llama"), connector_k=5)


def test_connector_norm_gains_start_at_the_embedding_scale():
    """Default gains: embedding RMS / k, so each normalised tap has RMS(embeddings) / k per dimension."""
    base = tiny_model("llama", num_layers=4)
    model = RecursiveModel.wrap(base, connector_k=2, connector_norm="embeddings")
    rms = float(base.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
    feature = torch.randn(2, 5, base.config.hidden_size) * 7
    normalised = model.connector.norms[0](feature)
    torch.testing.assert_close(normalised.pow(2).mean(-1).sqrt(), torch.full((2, 5), rms / 2), rtol=1e-4, atol=0)
    explicit = RecursiveModel.wrap(base, connector_gain=0.5, connector_norm="embeddings")
    assert all(torch.equal(norm.weight, torch.full_like(norm.weight, 0.5)) for norm in explicit.connector.norms)
    with pytest.raises(DepthkitError, match="connector_gain"):
        RecursiveModel.wrap(base, connector_gain=-1.0)


def test_connector_sized_by_the_residual_scales_with_it():
    """connector_norm="residual": the update is scale x the residual's RMS, token by token, with each
    tap's normalised feature at RMS 1/k, so it follows the residual's size (not the embeddings')."""
    base = tiny_model("llama", num_layers=4)
    model = RecursiveModel.wrap(base, connector_k=2, connector_norm="residual", scale_init=0.3)
    taps = [torch.randn(2, 5, base.config.hidden_size) for _ in range(2)]
    residual = torch.randn(2, 5, base.config.hidden_size) * torch.tensor([1.0, 10.0, 100.0, 0.1, 3.0])[:, None]
    with torch.no_grad():
        update = model.connector(taps, residual) - residual
        fused = sum(norm(tap) for norm, tap in zip(model.connector.norms, taps))
    rms = residual.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(update, 0.3 * rms * fused, rtol=1e-5, atol=1e-6)
    single = model.connector.norms[0](taps[0]).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(single, torch.full((2, 5), 0.5), rtol=1e-4, atol=0)  # gain 1 / k
    with torch.no_grad():
        doubled = model.connector(taps, 2 * residual) - 2 * residual
    torch.testing.assert_close(doubled, 2 * update, rtol=1e-5, atol=1e-6)
    with pytest.raises(DepthkitError, match="connector_norm"):
        RecursiveModel.wrap(base, connector_norm="tokens")


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_connector_onto_the_output_at_scale_zero_is_vanilla_recursion(arch):
    """residual="output": the next input is this step's output plus the connector's correction, so at
    scale 0 every step equals vanilla recursion (the last hidden state fed straight back)."""
    base = tiny_model(arch, num_layers=4)
    onto_output = RecursiveModel.wrap(base, num_loops=3, ends=1, residual="output", connector_k=2,
                                      connector_norm="residual", scale_init=0.0)
    vanilla = RecursiveModel.wrap(base, num_loops=3, ends=1, feedback="vanilla")
    with torch.no_grad():
        got, expected = onto_output(ids(), return_all_steps=True), vanilla(ids(), return_all_steps=True)
    for a, b in zip(got.step_logits, expected.step_logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    with torch.no_grad():
        onto_output.connector.scale.fill_(0.5)
        moved = onto_output(ids(), return_all_steps=True)
    assert (moved.step_logits[1] - expected.step_logits[1]).abs().max() > 1e-4
    torch.testing.assert_close(moved.step_logits[0], expected.step_logits[0], atol=ATOL, rtol=0)


def test_connector_modalities_are_selected_by_the_token_type_mask():
    model = RecursiveModel.wrap(tiny_model("qwen3"), num_modalities=2, fuse="weighted", projection="mlp")
    with torch.no_grad():
        model.connector.scale.fill_(1.0)
        for tap in range(len(model.connector.positions)):  # modality 1's projections output zero
            for param in model.connector.projections[tap * 2 + 1].parameters():
                param.zero_()
    modality = torch.zeros(2, 10, dtype=torch.long)
    modality[:, 5:] = 1
    outputs = list(model.iter_steps(ids(), 2, modality_ids=modality))
    embeddings = model.embed(ids())
    taps, hidden = [], embeddings
    context = block_context(model.base, hidden)
    for index, layer in enumerate(model.layers):
        hidden = layer(hidden, **context.layer_kwargs(layer))
        if index in model.connector.positions:
            taps.append(hidden)
    torch.testing.assert_close(outputs[0].hidden, hidden, atol=ATOL, rtol=0)
    nxt = model.connector(taps, embeddings, modality)
    torch.testing.assert_close(nxt[:, 5:], embeddings[:, 5:])  # modality 1: nothing added
    assert (nxt[:, :5] - embeddings[:, :5]).abs().max() > 1e-3
    with pytest.raises(DepthkitError, match="modality_ids"):
        model(ids(), 2)


# -- loss --------------------------------------------------------------------------------------
def test_recursion_losses_on_hand_made_numbers():
    first = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    second = torch.tensor([[0.5, 2.5, 3.0]], requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert recursion_loss([first, second], mask, "last").item() == pytest.approx(6.0 / 3)
    assert recursion_loss([first, second], mask, "sum").item() == pytest.approx(12.0 / 3)
    # token 2 rose (2.0 -> 2.5): counted beta = 2 times
    loss = recursion_loss([first, second], mask, "monotonic", beta=2.0, detach=True)
    assert loss.item() == pytest.approx((6.0 + 0.5 + 5.0 + 3.0) / 3)
    loss.backward()
    assert first.grad[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert second.grad[0].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    first.grad = second.grad = None
    hinge = recursion_loss([first, second], mask, "monotonic", beta=2.0, detach=False)
    assert hinge.item() == pytest.approx((6.0 + 0.5 + 3.0 + 3.0) / 3)
    hinge.backward()
    assert first.grad[0].tolist() == pytest.approx([1 / 3, 0.0, 1 / 3])
    with pytest.raises(DepthkitError):
        recursion_loss([first, second], mask, "monotonic", beta=0.5)


def test_token_losses_ignore_masked_labels():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0
    labels = torch.tensor([[0, 2, -100]])
    losses, mask = token_losses(logits, labels)
    assert mask.tolist() == [[True, False]]
    assert losses[0, 1].item() == 0.0 and losses[0, 0].item() < 1e-3
    result = step_losses([logits, logits], labels, "sum")
    assert result.per_step == pytest.approx([losses[0, 0].item()] * 2)


# -- relaxed recursive -------------------------------------------------------------------------
def test_sharing_patterns_map_layers():
    assert sharing_plan("cycle", 6, 3).assignment == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert sharing_plan("sequence", 6, 3).assignment == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    middle = sharing_plan("middle", 8, 5)
    assert middle.assignment == [(0, 0), (1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1), (4, 0)]
    assert (middle.prelude, middle.block, middle.coda, middle.loops) == ([0], [1, 2, 3], [4], 2)
    assert init_sources(sharing_plan("cycle", 6, 3), "stepwise") == {0: [0], 1: [2], 2: [5]}
    assert init_sources(sharing_plan("cycle", 6, 3), "lower") == {0: [0], 1: [1], 2: [2]}
    assert init_sources(sharing_plan("cycle", 6, 3), "average") == {0: [0, 3], 1: [1, 4], 2: [2, 5]}
    assert init_sources(middle, "stepwise") == {0: [0], 4: [7], 1: [1], 2: [4], 3: [6]}
    with pytest.raises(DepthkitError, match="divisible"):
        sharing_plan("cycle", 6, 4)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize(("sharing", "shared", "init"),
                         [("cycle", 3, "stepwise"), ("sequence", 3, "average"), ("middle", 4, "random")])
def test_full_rank_relaxation_reproduces_the_original(arch, sharing, shared, init):
    # A shared layer keeps its own attention window, so where sliding-window and full-attention
    # layers mix (Gemma) a relaxation is exact only when they do not: one type here.
    uniform = {"layer_types": ["sliding_attention"] * 6} if arch.startswith("gemma") else {}
    base = tiny_model(arch, num_layers=6, **uniform)
    reference = base(ids()).logits
    model = relax(base, shared, sharing, init, rank="full", loop_norms="original")
    assert len(model.layers) == shared
    torch.testing.assert_close(model(ids()).logits, reference, atol=1e-5, rtol=0)


def test_loop_norms_start_from_the_shared_layer_unless_asked_for_the_original():
    """MoR / Relaxed Recursive: a loop's norms are the shared layer's; the original copy is an option."""
    base = tiny_model("llama", num_layers=4)
    with torch.no_grad():
        for index, layer in enumerate(get_adapter(base).layers(base)):
            get_adapter(base).block(layer).attn_norm.weight.fill_(1.0 + index)
    originals = [get_adapter(base).block(layer).attn_norm.weight.clone() for layer in get_adapter(base).layers(base)]
    for loop_norms in ("shared", "original"):
        model = relax(copy.deepcopy(base), 2, "cycle", "lower", rank=2, loop_norms=loop_norms)
        assert model.config.source["loop_norms"] == loop_norms
        for index, (k, loop) in enumerate(sharing_plan("cycle", 4, 2).assignment):
            norm = model.adapters.norms[f"{k}_attn_norm_loop{loop}"]
            expected = originals[index] if loop_norms == "original" else originals[k]
            torch.testing.assert_close(norm.float(), expected.float())
    with pytest.raises(DepthkitError, match="unknown loop_norms"):
        relax(copy.deepcopy(base), 2, rank=2, loop_norms="mine")


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_rank_zero_is_strict_recursion(arch):
    reference = tiny_model(arch, num_layers=6)(ids()).logits
    strict = relax(tiny_model(arch, num_layers=6), 3, "cycle", "lower", rank=0)
    assert len(strict.adapters.relax) == 0 and len(strict.adapters.norms) == 0
    torch.testing.assert_close(strict(ids()).logits, looped_reference(strict.base, [0, 1, 2, 0, 1, 2]),
                               atol=ATOL, rtol=0)
    low = relax(tiny_model(arch, num_layers=6), 3, "cycle", "lower", rank=2)
    assert (low(ids()).logits - reference).abs().max() > 1e-4  # a partial relaxation is neither
    assert (low(ids()).logits - strict(ids()).logits).abs().max() > 1e-4


def test_partial_rank_relaxation_is_the_best_rank_r_approximation_of_every_original_layer():
    """Eckart-Young: each loop's shared weight + B A misses its original layer by exactly the
    singular values the truncation dropped (a transposed or mis-scaled SVD would miss by more)."""
    base = tiny_model("llama", num_layers=4)
    originals = [copy.deepcopy(layer) for layer in get_adapter(base).layers(base)]
    model = relax(base, 2, "cycle", "stepwise", rank=3)
    plan = sharing_plan("cycle", 4, 2)
    for index, (k, loop) in enumerate(plan.assignment):
        for name in ("query", "mlp_out"):
            original = getattr(model.adapter.block(originals[index]), name).weight.double()
            shared = getattr(model.adapter.block(model.layers[k]), name).weight.double()
            lora = model.adapters.relax[f"{k}_{name}_loop{loop}"]
            effective = shared + lora.scaling * lora.lora_B.double() @ lora.lora_A.double()
            dropped = torch.linalg.svdvals(original - shared)[3:]
            torch.testing.assert_close(torch.linalg.matrix_norm(original - effective), dropped.norm(),
                                       rtol=1e-5, atol=1e-6)


def test_per_loop_lora_on_a_looped_decoder_starts_exact_and_learns_per_loop():
    """Without an SVD residual to start from (the whole decoder looped), B = 0 keeps the start
    exact and a random A lets every loop's B receive its own gradient."""
    base = tiny_model("llama")
    strict = RecursiveModel.wrap(base, num_loops=3, feedback="vanilla")(ids()).logits
    model = RecursiveModel.wrap(base, num_loops=3, feedback="vanilla", loop_lora_rank=2, relaxed_loops=3)
    torch.testing.assert_close(model(ids()).logits, strict, atol=ATOL, rtol=0)
    model(ids()).logits.float().pow(2).mean().backward()
    grads = [model.adapters.relax[f"0_query_loop{loop}"].lora_B.grad for loop in range(3)]
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    assert (grads[0] - grads[1]).abs().max() > 0


def test_truncation_keeps_the_first_or_evenly_spaced_layers():
    base = tiny_model("llama", num_layers=6)
    originals = list(get_adapter(base).layers(base))
    kept = list(get_adapter(base).layers(truncate_layers(base, 3, pick="stepwise")))
    assert [originals.index(layer) for layer in kept] == [0, 2, 5]  # round(linspace(0, 5, 3)) = 0, 2.5 -> 2, 5
    assert [id(m) for m in get_adapter(base).layers(truncate_layers(base, 2))] == [id(originals[0]), id(originals[2])]
    with pytest.raises(DepthkitError, match="layer pick"):
        truncate_layers(tiny_model("llama"), 1, pick="last")


def test_lora_rank_above_layer_rank_is_an_error():
    with pytest.raises(DepthkitError, match="above the rank"):
        relax(tiny_model("llama", num_layers=4), 2, rank=33)  # k_proj is 32 x 64


def test_bad_loops_are_errors():
    model = RecursiveModel.wrap(tiny_model("llama"))
    for loops in (0, -1):
        with pytest.raises(DepthkitError, match="loops"):
            model(ids(), num_loops=loops)


# -- generation --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_kept_ends_run_once_around_the_loop(arch):
    base = tiny_model(arch)
    model = RecursiveModel.wrap(base, num_loops=3, feedback="vanilla", ends=1)
    assert (model.config.prelude, model.config.block, model.config.coda) == ([0], [1, 2], [3])
    torch.testing.assert_close(model(ids(), num_loops=1).logits, base(ids()).logits, atol=ATOL, rtol=0)
    reference = looped_reference(base, [0, 1, 2, 1, 2, 1, 2, 3])  # the coda once, after the decoded step
    torch.testing.assert_close(model(ids(), num_loops=3).logits, reference, atol=ATOL, rtol=0)
    with pytest.raises(DepthkitError, match=r"ends must be an integer in 0..1"):
        RecursiveModel.wrap(base, ends=2)


def connector_model(arch: str) -> RecursiveModel:
    model = RecursiveModel.wrap(tiny_model(arch), num_loops=3)
    with torch.no_grad():
        model.connector.scale.fill_(0.7)
    return model


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_cached_generation_equals_uncached_greedy(arch):
    prompt = ids(1, 6)
    ends = RecursiveModel.wrap(tiny_model(arch), num_loops=3, ends=1, connector_k=2, scale_init=0.7,
                               residual="previous")  # a prelude and a coda around a connector loop
    for model in (connector_model(arch), relax(tiny_model(arch, num_layers=6), 4, "middle", rank=2), ends):
        cached = generate(model, prompt, 8)
        uncached = generate(model, prompt, 8, use_cache=False)
        assert cached.new_tokens == uncached.new_tokens
        # and the logits match at the last position
        full = model(cached.input_ids[:, :-1]).logits[:, -1]
        cache = DynamicCache()
        model(cached.input_ids[:, :-2], past_key_values=cache)
        step = model(cached.input_ids[:, -2:-1], past_key_values=cache).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_early_exit_thresholds(arch):
    model, prompt = connector_model(arch), ids(1, 5)
    never = generate(model, prompt, 6, exit_threshold=0.0)
    assert never.loops.steps_used == [3] * 5 and never.loops.saved_fraction == 0.0
    assert never.new_tokens == generate(model, prompt, 6).new_tokens
    always = generate(model, prompt, 6, exit_threshold=1e9)
    assert always.loops.steps_used == [2] * 5  # the first step whose KL to its predecessor exists
    assert always.loops.saved_fraction == pytest.approx(1 / 3)
    assert never.loops.step_counts() == [0, 0, 5] and always.loops.step_counts() == [0, 5, 0]
    with pytest.raises(DepthkitError, match="one prompt"):
        generate(model, ids(2, 5), 2, exit_threshold=1.0)


# -- training and checkpoints ------------------------------------------------------------------
def test_gradient_checkpointing_keeps_per_loop_adapters():
    blocks = ids(2, 12)
    grads = []
    for checkpointing in (False, True):
        model = relax(tiny_model("qwen2", num_layers=6), 3, rank=2)
        model.train()
        model.gradient_checkpointing = checkpointing
        model(blocks, return_all_steps=False).logits.float().pow(2).mean().backward()
        grads.append(model.adapters.relax["1_query_loop1"].lora_A.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_training_reduces_the_loss():
    model = RecursiveModel.wrap(tiny_model("llama"), num_loops=2, lora_rank=4)
    blocks = ids(8, 16)
    result = train(model, blocks, blocks[:2], RecursiveTrainSettings(steps=6, loops=2, batch_size=4, lr=1e-2,
                   connector_lr=1e-2, trainable=("connector", "lora"), eval_every=6, mixed_precision="no"),
                   progress=False)
    first, last = result.evaluations[0]["perplexity"], result.evaluations[-1]["perplexity"]
    assert len(first) == 2 and last[-1] < first[-1]


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed at step 8 of 9 (mid-epoch: 5 batches per epoch), resumed from step 6: the same
    history, evaluations and final weights as a run never interrupted."""
    blocks = ids(20, 16)
    settings = RecursiveTrainSettings(steps=9, loops=2, batch_size=4, lr=1e-2, connector_lr=1e-2, warmup_steps=2,
                                      trainable=("connector", "lora"), eval_every=3, mixed_precision="no",
                                      checkpoint_every=2)

    def run(folder=None, resume=False, run_settings=settings):
        model = RecursiveModel.wrap(tiny_model("qwen3"), num_loops=2, lora_rank=2)
        result = train(model, blocks, blocks[:2], run_settings, progress=False, checkpoint_dir=folder, resume=resume)
        return model, result

    straight_model, straight = run()
    folder = tmp_path / "run.checkpoints"
    interrupt_training(monkeypatch, at_step=8)
    with pytest.raises(KeyboardInterrupt):
        run(folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["settings.json", "step-0000004", "step-0000006"]  # rotated
    with pytest.raises(DepthkitError, match="earlier run"):
        run(folder)  # a new run never mixes with another run's checkpoints
    with pytest.raises(DepthkitError, match="beta: 2.0 -> 3.0"):
        run(folder, resume=True, run_settings=replace(settings, beta=3.0))
    model, resumed = run(folder, resume=True)
    assert resumed.history == straight.history and resumed.evaluations == straight.evaluations
    theirs = straight_model.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_save_and_reload_round_trip(tmp_path, arch):
    model = relax(tiny_model(arch, num_layers=6), 4, "middle", rank=3)
    with torch.no_grad():
        for param in model.adapters.parameters():
            param.add_(0.01)
    model.save_pretrained(tmp_path / "relaxed")
    reloaded = RecursiveModel.from_pretrained(tmp_path / "relaxed")
    torch.testing.assert_close(reloaded(ids()).logits, model(ids()).logits, atol=0, rtol=0)
    wrapped = connector_model(arch)
    wrapped.save_pretrained(tmp_path / "wrapped")
    again = RecursiveModel.from_pretrained(tmp_path / "wrapped")
    torch.testing.assert_close(again(ids(), 3).logits, wrapped(ids(), 3).logits, atol=0, rtol=0)
    with pytest.raises(DepthkitError, match="already exists"):
        wrapped.save_pretrained(tmp_path / "wrapped")


def test_residual_sized_connector_reloads_and_older_configs_keep_the_embedding_size(tmp_path):
    model = RecursiveModel.wrap(tiny_model("mistral", num_layers=4), num_loops=3, ends=1, connector_k=2,
                                residual="previous", connector_norm="residual", scale_init=0.4)
    model.save_pretrained(tmp_path / "sized")
    reloaded = RecursiveModel.from_pretrained(tmp_path / "sized")
    assert reloaded.config.connector_norm == "residual" and reloaded.connector.relative
    torch.testing.assert_close(reloaded(ids()).logits, model(ids()).logits, atol=0, rtol=0)
    saved = json.loads((tmp_path / "sized" / "recursive_config.json").read_text())
    del saved["connector_norm"]  # a config written before the option existed
    assert RecursiveConfig.from_dict(saved).connector_norm == "embeddings"


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    connector_model("llama").save_pretrained(tmp_path / "ck")
    with pytest.raises(DepthkitError, match="another architecture"):
        RecursiveModel.from_pretrained(tmp_path / "ck", base=tiny_model("qwen3"))
    with pytest.raises(DepthkitError, match="not a recursive model"):
        RecursiveModel.from_pretrained(tmp_path)


# -- command line --------------------------------------------------------------------------------
def _cli_text_args(tmp_path) -> list[str]:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and then some more text" for i in range(400)))
    return ["--data", str(text), "--data-split", "all", "--eval-data", str(text), "--eval-data-split", "all",
            "--interleave", "--train-blocks", "4", "--eval-blocks", "2", "--seq-len", "16", "--batch-size", "2",
            "--mixed-precision", "no"]


def test_cli_relaxes_trains_and_saves_the_plans_loops(tmp_path):
    from depthkit.cli.main import main

    out = tmp_path / "relaxed"
    assert main(["recursive", "train", "--model", "tiny:llama", "--relax", "2", "--loop-lora-rank", "2",
                 "--train", "layers,loop_lora", "--steps", "2", *_cli_text_args(tmp_path), "--out", str(out)]) == 0
    model = RecursiveModel.from_pretrained(out)
    assert (model.config.num_loops, model.config.relaxed_loops, model.config.feedback) == (2, 2, "vanilla")
    assert model.config.source["sharing"] == "cycle" and len(model.layers) == 2


@pytest.mark.parametrize("options, message", [
    (["--loops", "3"], "loops the shared layers 2 times"),
    (["--ends", "1"], "--sharing middle"),
    (["--feedback", "connector"], "feeds each loop's hidden state on"),
])
def test_cli_refuses_looped_decoder_options_with_relax(tmp_path, capsys, options, message):
    from depthkit.cli.main import main

    assert main(["recursive", "train", "--model", "tiny:llama", "--relax", "2", *options, "--steps", "0",
                 *_cli_text_args(tmp_path), "--out", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_trains_a_looped_middle_with_per_loop_lora_and_generates(tmp_path, capsys):
    from depthkit.cli.main import main

    out = tmp_path / "looped"
    assert main(["recursive", "train", "--model", "tiny:llama", "--layers", "3", "--layer-pick", "stepwise",
                 "--loops", "2", "--ends", "1", "--connector-k", "1", "--loop-lora-rank", "2",
                 "--train", "connector,layers,loop_lora", "--steps", "2", *_cli_text_args(tmp_path),
                 "--out", str(out)]) == 0
    model = RecursiveModel.from_pretrained(out)
    assert model.config.num_base_layers == 3 and model.config.relaxed_loops == 2
    assert (model.config.prelude, model.config.block, model.config.coda) == ([0], [1], [2])
    assert sum(p.abs().sum() for n, p in model.adapters.relax.named_parameters() if "lora_B" in n) > 0  # trained
    assert main(["recursive", "generate", str(out), "--prompt", "word1 and", "--max-new-tokens", "3",
                 "--loops", "3", "--json", str(tmp_path / "gen.json")]) == 0
    generated = json.loads((tmp_path / "gen.json").read_text())
    assert generated["completion"] and generated["loops"] == 3 and generated["max_steps"] == 3  # deeper than trained


def test_cli_resumes_an_interrupted_run_from_its_own_checkpoints(tmp_path, capsys, monkeypatch):
    from depthkit.cli.main import main

    def train_command(out, *extra):
        return main(["recursive", "train", "--model", "tiny:llama", "--steps", "5", "--checkpoint-every", "2",
                     "--keep-checkpoints", "1", *_cli_text_args(tmp_path), "--out", str(out), *extra])

    assert train_command(tmp_path / "straight") == 0
    assert not (tmp_path / "straight.checkpoints").exists()  # removed once the model is saved
    out = tmp_path / "looped"
    interrupt_training(monkeypatch, at_step=4)
    assert train_command(out) == 130  # as a Ctrl-C or SIGTERM at step 4
    monkeypatch.undo()
    assert not out.exists() and [p.name for p in (tmp_path / "looped.checkpoints").glob("step-*")] == ["step-0000002"]
    assert train_command(out) == 2 and "earlier run" in capsys.readouterr().err
    assert train_command(out, "--resume", "--lr", "1e-3") == 2 and "lr: 0.0001 -> 0.001" in capsys.readouterr().err
    assert train_command(out, "--resume") == 0 and not (tmp_path / "looped.checkpoints").exists()
    weights = sorted(p.relative_to(out) for p in out.rglob("*.safetensors"))
    assert weights and all((out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes() for name in weights)


def test_cli_saves_an_early_exit_default_that_generate_uses(tmp_path, capsys):
    """`--save-exit-threshold` (with `--exit-rule`) goes into config.json, where transformers' remote code
    reads it; `recursive generate` uses it too unless told otherwise, so the folder behaves the same."""
    from depthkit.cli.main import main

    def train_command(out, *extra):
        return main(["recursive", "train", "--model", "tiny:llama", "--loops", "4", "--steps", "0",
                     *_cli_text_args(tmp_path), "--out", str(out), *extra])

    def generate_json(folder, *extra):
        assert main(["recursive", "generate", str(folder), "--prompt", "word1 and", "--max-new-tokens", "4",
                     "--json", str(tmp_path / "gen.json"), *extra]) == 0
        return json.loads((tmp_path / "gen.json").read_text())

    assert train_command(tmp_path / "exits", "--save-exit-threshold", "0.01", "--exit-rule", "hidden") == 0
    assert train_command(tmp_path / "plain") == 0
    saved = json.loads((tmp_path / "exits" / "config.json").read_text())
    assert (saved["exit_threshold"], saved["exit_rule"]) == (0.01, "hidden")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["exit_threshold"] is None

    # a threshold every token is below: each exits at step 2 of 4, by default as when asked for
    assert train_command(tmp_path / "eager", "--save-exit-threshold", "1000", "--exit-rule", "hidden") == 0
    by_default = generate_json(tmp_path / "eager")
    assert (by_default["exit_threshold"], by_default["exit_rule"], by_default["mean_steps"]) == (1000, "hidden", 2)
    assert "the folder's saved default" in capsys.readouterr().out
    assert by_default == generate_json(tmp_path / "plain", "--exit-threshold", "1000", "--exit-rule", "hidden")
    turned_off = generate_json(tmp_path / "eager", "--exit-threshold", "off")
    assert turned_off == {**generate_json(tmp_path / "plain"), "exit_rule": "hidden"}  # the saved rule stays
    assert turned_off["exit_threshold"] is None and turned_off["mean_steps"] == turned_off["max_steps"] == 4
    assert generate_json(tmp_path / "eager", "--exit-rule", "kl")["exit_rule"] == "kl"
    capsys.readouterr()
    assert main(["recursive", "generate", str(tmp_path / "eager"), "--prompt", "a", "--no-cache"]) == 2
    assert "add --exit-threshold off" in capsys.readouterr().err


def test_early_exit_prefill_fills_every_cache_slot():
    """Each step's coda has its own cache slot; a token that exits at step r runs step r's coda,
    which must see the prompt's keys and values there (not attend to itself alone)."""
    model = RecursiveModel.wrap(tiny_model("llama"), num_loops=2, ends=1, connector_k=1).eval()
    cache = DynamicCache()
    decode_step(model, torch.randint(0, 256, (1, 5)), 2, cache, every_step=True)
    assert [layer.keys.shape[2] for layer in cache.layers] == [5] * len(cache.layers)


def test_recursive_eval_scores_every_domain_by_default(tmp_path):
    """`recursive eval` scores held-out blocks of every offline domain, each in turn (one book says
    little about the others), and early exit on the opening tokens of every block."""
    from depthkit.cli.main import main
    from depthkit.data.corpora import DEFAULT_CALIB

    assert main(["recursive", "train", "--model", "tiny:llama", "--loops", "3", "--steps", "0",
                 *_cli_text_args(tmp_path), "--out", str(tmp_path / "looped")]) == 0
    assert main(["recursive", "eval", str(tmp_path / "looped"), "--blocks", "5", "--seq-len", "16",
                 "--exit-threshold", "1e9", "--exit-rule", "hidden", "--exit-tokens", "40",
                 "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["data"].startswith(DEFAULT_CALIB) and len(result["step_perplexity"]) == 3
    full, early = result["early_exit"]
    assert full["tokens"] == early["tokens"] == 5 * (40 // 5 - 1)  # 8 opening tokens of each block: 7 predictions
    assert full["loops_saved"] == 0 and early["loops_saved"] > 0


def test_defaults_are_the_measured_recipe_and_old_configs_keep_theirs():
    """One default per knob: RecursiveConfig's (the CLI's and benchmarks' come from it); a config saved
    before a field existed loads with the value it had then, not the new default."""
    from depthkit.cli.main import build_parser
    from depthkit.data.corpora import DEFAULT_CALIB
    from depthkit.recursive.config import LEGACY_DEFAULTS

    config = RecursiveConfig(block=[0, 1, 2, 3])
    assert (config.num_loops, config.residual, config.scale_init, config.connector_norm) == (3, "previous", 0.1,
                                                                                            "residual")
    args = build_parser().parse_args(["recursive", "train", "--out", "x"])
    assert (args.residual, args.scale_init, args.connector_norm) == (config.residual, config.scale_init,
                                                                     config.connector_norm)
    # trained and evaluated on every domain, in turn from every document, as compress calibrates
    assert (args.data, args.eval_data, args.interleave) == (DEFAULT_CALIB, DEFAULT_CALIB, True)
    saved = config.to_dict()
    for key in LEGACY_DEFAULTS:
        del saved[key]
    old = RecursiveConfig.from_dict(saved)
    assert (old.num_loops, old.residual, old.scale_init, old.connector_norm) == (2, "embeddings", 0.0, "embeddings")


def test_loops_are_bounded():
    from depthkit.recursive.config import MAX_LOOPS, check_loops

    assert check_loops(MAX_LOOPS) == MAX_LOOPS
    for bad in (0, MAX_LOOPS + 1, 100000, True, 2.0):
        with pytest.raises(DepthkitError, match="number of loops must be an integer in 1.."):
            check_loops(bad)


def test_generation_refuses_to_run_past_the_context():
    model = RecursiveModel.wrap(tiny_model("llama"), num_loops=2).eval()  # 512-token context
    with pytest.raises(DepthkitError, match="500-token prompt plus 40 new tokens exceeds the model's context of 512"):
        generate(model, torch.randint(0, 256, (1, 500)), 40)


def test_a_looped_folder_never_asks_about_remote_code_and_plain_commands_refuse_it(tmp_path, capsys):
    """Its config.json names remote code: depthkit loads its tokenizer without transformers' terminal
    prompt, and a command for plain checkpoints says what the folder is instead of prompting."""
    from depthkit.cli.main import main
    from depthkit.models.loading import LOOPED_MODEL_TYPE, load_tokenizer
    from depthkit.recursive.modeling_depthkit_looped import DepthkitLoopedConfig

    assert DepthkitLoopedConfig.model_type == LOOPED_MODEL_TYPE
    folder = tmp_path / "looped"
    assert main(["recursive", "train", "--model", "tiny:llama", "--loops", "2", "--steps", "0",
                 *_cli_text_args(tmp_path), "--out", str(folder)]) == 0
    capsys.readouterr()
    assert load_tokenizer(str(folder))("word1 and")["input_ids"]
    assert main(["eval", "ppl", "--model", str(folder), "--data", str(tmp_path / "text.txt")]) == 2
    captured = capsys.readouterr()
    assert "custom code" not in captured.out + captured.err
    assert captured.err.strip().splitlines() == [
        f"depthkit: error: {folder} is a depthkit looped model, not a plain checkpoint: use `depthkit recursive "
        "eval|generate` or `depthkit serve` (transformers loads it with trust_remote_code=True)"]
