"""VLModel: forward / generate, the input path, save & load, the factory and its errors."""

import json

import pytest
import torch
from torch import nn

from workbench.models import (
    CheckpointError,
    EncoderInputs,
    VisualEncoder,
    VLModel,
    list_backbones,
    load_backbone,
    register_backbone,
    train_tokenizer,
)
from workbench.models import factory as factory_mod
from workbench.utils import repo_root

FEAT_DIM, N_VISUAL = 16, 5  # the sizes the conftest fixtures use

# --- forward and generate ----------------------------------------------------------------------


def test_forward_shapes_and_loss(tiny_model, batch):
    out = tiny_model(**batch)
    b, t = batch["labels"].shape
    assert out.logits.shape == (b, t, tiny_model.config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.encoder_last_hidden_state.shape[1] == N_VISUAL + batch["input_ids"].shape[1]
    assert tiny_model.family in ("t5", "bart")
    assert tiny_model.config.feat_dim == FEAT_DIM and tiny_model.config.n_enc_layers == 2


def test_forward_traces_as_one_graph(tiny_model, batch):
    """torch.compile captures the whole forward, loss included, without a graph break (so a GPU user
    can compile it); the input checks that read tensor values step aside while tracing."""
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(lambda: tiny_model(**batch).loss)()
    finally:
        torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, \
        [r.reason for r in explained.break_reasons]


def test_generate_greedy_and_beam(tiny_model, batch):
    args = {k: batch[k] for k in ("visual_feats", "input_ids", "attention_mask")}
    greedy = tiny_model.generate(**args, max_new_tokens=4)
    beam = tiny_model.generate(**args, num_beams=3, max_new_tokens=4)
    for ids in (greedy, beam):
        assert ids.shape[0] == 2 and 2 <= ids.shape[1] <= 5 and ids.dtype == torch.long
    texts = tiny_model.generate_text(**args, num_beams=2, max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # prompts may be given as strings too
    assert tiny_model.generate_text(batch["visual_feats"], ["vqa: a?", "caption:"], max_new_tokens=3).__len__() == 2


def test_text_embedding_matches_the_lm_exactly(tiny_model, batch):
    """With no visual tokens the model is the LM fed input_ids: BART's embed_scale is applied exactly."""
    empty = torch.zeros(2, 0, FEAT_DIM)
    ours = tiny_model(empty, batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits
    ref = tiny_model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).logits
    assert torch.equal(ours, ref)
    if tiny_model.family == "bart":
        assert tiny_model.lm.get_encoder().embed_tokens.embed_scale != 1.0  # the scale was really exercised


def test_visual_tokens_come_first(tiny_model, batch):
    inputs = tiny_model.build_encoder_inputs(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    assert inputs.n_visual == N_VISUAL
    assert torch.equal(inputs.embeds[:, :N_VISUAL], tiny_model.projector(batch["visual_feats"]))
    text = tiny_model.lm.get_encoder().embed_tokens(batch["input_ids"])
    assert torch.equal(inputs.embeds[:, N_VISUAL:], text)
    assert torch.equal(inputs.mask[:, :N_VISUAL], torch.ones(2, N_VISUAL, dtype=torch.long))
    assert torch.equal(inputs.mask[:, N_VISUAL:], batch["attention_mask"])


def test_visual_mask_hides_slots(tiny_model, batch):
    vmask = torch.ones(2, N_VISUAL, dtype=torch.long)
    vmask[:, -2:] = 0
    a = tiny_model(**batch, visual_mask=vmask).logits
    feats = batch["visual_feats"].clone()
    feats[:, -2:] = 100.0  # changing masked slots must not change anything
    b = tiny_model(**{**batch, "visual_feats": feats}, visual_mask=vmask).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_overfits_two_examples(tiny_model, batch):
    torch.manual_seed(0)
    model = tiny_model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_projector_is_trainable_and_seeded(tiny_hf_dirs):
    state = torch.random.get_rng_state()
    a = load_backbone(tiny_hf_dirs["t5"], feat_dim=FEAT_DIM, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeding did not move the global RNG
    b = load_backbone(tiny_hf_dirs["t5"], feat_dim=FEAT_DIM, seed=3)
    c = load_backbone(tiny_hf_dirs["t5"], feat_dim=FEAT_DIM, seed=4)
    assert torch.equal(a.projector[0].weight, b.projector[0].weight)
    assert not torch.equal(a.projector[0].weight, c.projector[0].weight)
    assert isinstance(a.projector[1], nn.LayerNorm) and a.projector[0].in_features == FEAT_DIM


# --- the input-modifier hook (prompt tuning) --------------------------------------------------


class Prompt(nn.Module):
    """Prompt tuning as a workbench method would write it."""

    def __init__(self, length, d):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(length, d) * 0.5)

    def forward(self, inputs: EncoderInputs) -> EncoderInputs:
        return inputs.insert(inputs.n_visual, self.prompt)


def test_input_modifier_prompt_tuning(tiny_model, batch):
    torch.manual_seed(0)
    prompt = Prompt(3, tiny_model.d_model)
    tiny_model.add_input_modifier(prompt)
    inputs = tiny_model.build_encoder_inputs(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    assert inputs.embeds.shape[1] == N_VISUAL + 3 + batch["input_ids"].shape[1]
    assert torch.equal(inputs.embeds[0, N_VISUAL:N_VISUAL + 3], prompt.prompt)
    assert inputs.mask.shape == inputs.embeds.shape[:2]

    # forward == the LM fed the hand-built sequence [visual ; prompt ; text]
    vis = tiny_model.projector(batch["visual_feats"])
    text = tiny_model.lm.get_encoder().embed_tokens(batch["input_ids"])
    manual = torch.cat([vis, prompt.prompt.expand(2, -1, -1), text], dim=1)
    mask = torch.cat([torch.ones(2, N_VISUAL + 3, dtype=torch.long), batch["attention_mask"]], dim=1)
    ref = tiny_model.lm(inputs_embeds=manual, attention_mask=mask, labels=batch["labels"])
    out = tiny_model(**batch)
    assert torch.equal(out.logits, ref.logits)

    # generate sees the prompt too
    ids = tiny_model.generate(batch["visual_feats"], batch["input_ids"], batch["attention_mask"], max_new_tokens=4)
    enc = tiny_model.lm.get_encoder()(inputs_embeds=manual, attention_mask=mask)
    ref_ids = tiny_model.lm.generate(encoder_outputs=enc, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(ids, ref_ids)

    out.loss.backward()
    assert prompt.prompt.grad is not None and prompt.prompt.grad.abs().sum() > 0
    assert any(n.startswith("input_modifiers.0.") for n, _ in tiny_model.named_parameters())
    assert tiny_model.remove_input_modifiers() == [prompt]
    assert not torch.equal(tiny_model(**batch).logits, out.logits)


def test_encoder_inputs_insert_validates(tiny_model, batch):
    inputs = tiny_model.build_encoder_inputs(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="vectors to insert"):
        inputs.insert(0, torch.zeros(3, tiny_model.d_model + 1))
    with pytest.raises(ValueError, match="position"):
        inputs.insert(999, torch.zeros(3, tiny_model.d_model))
    before = inputs.insert(0, torch.zeros(2, tiny_model.d_model))
    assert before.n_visual == N_VISUAL + 2  # inserted inside the visual block shifts its end


# --- bad inputs ----------------------------------------------------------------------------------


def test_forward_input_errors(tiny_model, batch):
    with pytest.raises(ValueError, match=r"feature dim 12.*feat_dim=16"):
        tiny_model(torch.randn(2, N_VISUAL, 12), batch["input_ids"], labels=batch["labels"])
    with pytest.raises(ValueError, match=r"\[batch, n_visual, feat_dim\]"):
        tiny_model(torch.randn(2, FEAT_DIM), batch["input_ids"], labels=batch["labels"])
    with pytest.raises(ValueError, match="batch sizes differ"):
        tiny_model(torch.randn(3, N_VISUAL, FEAT_DIM), batch["input_ids"], labels=batch["labels"][:1].repeat(3, 1))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(batch["visual_feats"], batch["input_ids"], batch["attention_mask"][:, :2], labels=batch["labels"])
    with pytest.raises(ValueError, match="visual_mask"):
        tiny_model(**batch, visual_mask=torch.ones(2, N_VISUAL + 1))
    with pytest.raises(ValueError, match="labels or decoder_input_ids"):
        tiny_model(batch["visual_feats"], batch["input_ids"])
    with pytest.raises(ValueError, match="input_ids must be in"):
        tiny_model(batch["visual_feats"], batch["input_ids"] + 10_000, labels=batch["labels"])
    with pytest.raises(ValueError, match="num_beams"):
        tiny_model.generate(batch["visual_feats"], batch["input_ids"], num_beams=0)


def test_encode_targets_pads_with_minus_100(tiny_model):
    labels = tiny_model.encode_targets(["red", "a small blue square"])
    assert (labels[0] == -100).any() and not (labels[1] == -100).any()
    assert labels[0, -1].item() == -100
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tiny_model.encode_targets([])


# --- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip(tiny_model, batch, tmp_path):
    before = tiny_model(**batch).logits
    args = (batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    gen_before = tiny_model.generate(*args, max_new_tokens=4)
    path = tiny_model.save_pretrained(tmp_path / "ckpt")
    assert {"workbench_config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
    loaded = load_backbone(path)
    assert loaded.family == tiny_model.family and loaded.config == tiny_model.config
    assert torch.equal(loaded(**batch).logits, before)
    gen_after = loaded.generate(*args, max_new_tokens=4)
    assert torch.equal(gen_after, gen_before)
    assert loaded.tokenizer("vqa: red?")["input_ids"] == tiny_model.tokenizer("vqa: red?")["input_ids"]
    # tied embeddings stayed tied after loading
    lm = loaded.lm
    assert lm.get_input_embeddings().weight.data_ptr() == lm.get_output_embeddings().weight.data_ptr()
    # saving again replaces the checkpoint atomically, leaving no temporary directories
    tiny_model.save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


class KeepH(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, h):
        return h * self.scale


def test_save_with_visual_encoder_and_modifications(make_tiny_lm, tmp_path):
    lm, tok = make_tiny_lm("t5")
    torch.manual_seed(1)
    enc = VisualEncoder(feat_dim=32, grid=2, channels=(8, 8, 8), pos_dim=8)
    model = VLModel(lm, tok, feat_dim=32, visual_encoder=enc).eval()
    model.add_sublayer_modification("encoder.0.ffn", KeepH())  # left out of the backbone file
    assert any(".peft_mods." in k for k in model.state_dict())
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    feats = model.encode_images(images)
    ids, mask = model.encode_prompts(["caption:", "caption:"])
    labels = model.encode_targets(["red", "blue"])
    before = model(feats, ids, mask, labels=labels).logits
    model.save_pretrained(tmp_path / "ve")
    loaded = load_backbone(tmp_path / "ve")
    assert loaded.visual_encoder is not None and loaded.config.visual_encoder == enc.config_dict()
    assert torch.equal(loaded.encode_images(images), feats)
    assert torch.equal(loaded(feats, ids, mask, labels=labels).logits, before)
    assert not loaded.modifications()


def test_corrupted_or_truncated_weights(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupted or truncated"):
        load_backbone(path)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_backbone(path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_backbone(path)


def test_feat_dim_disagreeing_with_checkpoint(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "ckpt")
    assert load_backbone(path, feat_dim=FEAT_DIM).config.feat_dim == FEAT_DIM
    with pytest.raises(ValueError, match=r"feat_dim=7.*feat_dim=16"):
        load_backbone(path, feat_dim=7)


def test_refuses_to_overwrite_a_foreign_directory(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a workbench checkpoint"):
        tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


# --- the factory -----------------------------------------------------------------------------------


def test_factory_errors(tiny_hf_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path)  # an empty directory
    with pytest.raises(ValueError, match="feat_dim= is required"):
        load_backbone(tiny_hf_dirs["t5"])
    with pytest.raises(TypeError, match="unknown option"):
        load_backbone(tiny_hf_dirs["t5"], feat_dim=4, colour="red")
    with pytest.raises(ValueError, match=r"unknown backbone 't5-base'.*vlt5-tiny"):
        load_backbone("t5-base")

    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*'bart', 't5'"):
        load_backbone(gpt, feat_dim=4)

    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((tiny_hf_dirs["t5"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_backbone(noweights, feat_dim=4)
    (noweights / "model.safetensors").write_bytes((tiny_hf_dirs["t5"] / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_backbone(noweights, feat_dim=4)


def test_vlt5_tiny_is_registered():
    assert "vlt5-tiny" in list_backbones()
    if (repo_root() / "data" / "checkpoints" / "vlt5-tiny" / "workbench_config.json").exists():
        pytest.skip("the embedded checkpoint exists: its own tests cover it")
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        load_backbone("vlt5-tiny")


def test_register_backbone(tiny_hf_dirs):
    @register_backbone("tiny-bart-test")
    def _tiny(**options):
        return load_backbone(tiny_hf_dirs["bart"], **options)

    try:
        assert "tiny-bart-test" in list_backbones()
        assert load_backbone("tiny-bart-test", feat_dim=8).family == "bart"
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("tiny-bart-test")(lambda **o: None)
    finally:
        factory_mod.BACKBONES.unregister("tiny-bart-test")
    assert "tiny-bart-test" not in list_backbones()


# --- the tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_train_tokenizer(family, tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(["a red circle", "a blue square"] * 3, vocab_size=270, family=family)
    ids = tok("zebra ünïcode 42")["input_ids"]
    assert tok.unk_token_id not in ids  # byte-level: any text encodes without <unk>
    assert tok.decode(ids, skip_special_tokens=True).strip() == "zebra ünïcode 42"
    assert ids[-1] == tok.eos_token_id
    if family == "t5":
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    else:
        assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2) and ids[0] == 0
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again("zebra")["input_ids"] == tok("zebra")["input_ids"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a"], vocab_size=100, family=family)
    with pytest.raises(ValueError, match="family"):
        train_tokenizer(["a"], vocab_size=300, family="gpt2")
