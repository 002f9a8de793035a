"""Tiny models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm MLP block: enough structure for the unit walk and for autograd checks."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class TinyLM(nn.Module):
    """A plain custom stack: embedding (+ positions), blocks, final norm and head."""

    def __init__(self, vocab: int = 32, d: int = 16, layers: int = 4, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(64, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a TinyLM."""
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_steps(model: nn.Module, opt, batches, sched=None) -> list[float]:
    """One optimizer step (and scheduler step, if given) per batch; returns the losses."""
    losses = []
    for ids in batches:
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def hook_count(model: nn.Module) -> int:
    """Forward (pre-)hooks on the blocks of a :class:`TinyLM` (backward truncation's)."""
    return sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in model.blocks)


def assert_a_cycle_changes_every_parameter(model: nn.Module, opt) -> None:
    """The optimizer trains every group: a full cycle changes every parameter of a TinyLM."""
    import copy

    before = copy.deepcopy(model.state_dict())
    train_steps(model, opt, [torch.randint(0, 32, (2, 8))] * opt.num_groups)
    assert all(not torch.equal(before[n], p) for n, p in model.state_dict().items())


def word_tokenizer(n_words: int = 61):
    """A fast word-level tokenizer of ``<pad>``, ``<eos>``, ``<unk>`` and ``w0`` .. ``w{n-1}``."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>", *(f"w{i}" for i in range(n_words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_hf_config(family: str):
    """A 2-3 layer, hidden-16 ``transformers`` config of ``family``."""
    import transformers as T

    common = dict(vocab_size=64)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        return cls(
            **common,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    if family == "gpt2":
        return T.GPT2Config(
            **common, n_embd=16, n_layer=3, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    if family == "gpt_neo":
        return T.GPTNeoConfig(
            **common,
            hidden_size=16,
            num_layers=3,
            num_heads=2,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "opt":
        return T.OPTConfig(
            **common,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=8,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    if family == "bert":
        return T.BertConfig(
            **common,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    if family == "roberta":
        return T.RobertaConfig(
            **common,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=40,
        )
    raise KeyError(family)


#: Config fields a tiny model of any ``transformers`` family sets, where its config has them.
TINY_FIELDS: dict[str, object] = {
    "vocab_size": 96,
    "decoder_vocab_size": 96,  # Marian
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embed_dim"), 32),
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "n_layers",
            "num_layers",
            "encoder_layers",
            "decoder_layers",
            "num_decoder_layers",
        ),
        2,
    ),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
        ),
        2,
    ),
    "num_key_value_heads": 1,
    **dict.fromkeys(
        (
            "intermediate_size",
            "ffn_dim",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "d_ff",
            "n_inner",
            "hidden_dim",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
        ),
        64,
    ),
    **dict.fromkeys(("head_dim", "d_kv", "d_head"), 16),
    **dict.fromkeys(("max_position_embeddings", "n_positions"), 64),
    # Mixture of experts: every token goes to every expert, so that every expert is trained.
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts"), 2),
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
    "rotary_dim": 8,  # GPT-J: a part of the 16-wide heads
    "mamba_chunk_size": 8,  # Falcon-H1: its CPU scan pads the sequence to a whole chunk
    "attention_types": [[["global", "local"], 1]],  # GPT-Neo: one entry per layer
}

#: Special token ids, and the value they get when the default does not fit the tiny vocabulary.
TINY_TOKEN_IDS = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
}


#: Heads of vision and audio models (as ``hiftune.memory.configs.HEADS`` names them) -> auto class.
MODALITY_HEADS = {
    "image-cls": "AutoModelForImageClassification",
    "ctc": "AutoModelForCTC",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "image-text-to-text": "AutoModelForImageTextToText",
}

#: What else a tiny vision or audio model sets: small images and spectrograms, a short conv stack.
TINY_MODALITY_FIELDS: dict[str, object] = {
    "image_size": 32,
    "patch_size": 8,
    "num_mel_bins": 16,
    "max_source_positions": 16,
    "max_target_positions": 64,
    # One convolution in a wav2vec2-style feature encoder: two would tie with the two encoder
    # layers for the main block stack (real models have 7 and 12).
    "conv_dim": (16,),
    "conv_kernel": (3,),
    "conv_stride": (2,),
    "num_feat_extract_layers": 1,
    "num_conv_pos_embeddings": 4,
    "num_conv_pos_embedding_groups": 2,
}


def _shrink_sub_configs(config, fields: dict[str, object]) -> None:
    """Rebuilds each sub-config (``vision_config``, ``text_config``, ...) with the tiny fields."""
    for name, sub in list(vars(config).items()):
        if not (hasattr(sub, "model_type") and hasattr(sub, "to_dict")):
            continue
        values = sub.to_dict()
        small = {k: v for k, v in fields.items() if k in values}
        if small:
            setattr(config, name, type(sub)(**{**values, **small}))


def tiny_auto_model(model_type: str, head: str = "causal-lm"):
    """A tiny ``transformers`` model of ``model_type``, from its default config made small.

    Args:
        model_type: A key of ``transformers``' config mapping (``"llama"``, ``"t5"``, ...).
        head: ``"causal-lm"``, ``"seq2seq-lm"``, ``"masked-lm"``, ``"seq-cls"`` or one of
            :data:`MODALITY_HEADS` (its sub-configs are made small too).

    Raises:
        Exception: Whatever ``transformers`` raises if the tiny config cannot be built.
    """
    import transformers as T

    defaults = T.AutoConfig.for_model(model_type).to_dict()
    fields = {**TINY_FIELDS, **(TINY_MODALITY_FIELDS if head in MODALITY_HEADS else {})}
    config = T.AutoConfig.for_model(
        model_type, **{k: v for k, v in fields.items() if k in defaults}
    )
    if head in MODALITY_HEADS:
        _shrink_sub_configs(config, fields)
    auto = {
        "causal-lm": T.AutoModelForCausalLM,
        "seq2seq-lm": T.AutoModelForSeq2SeqLM,
        "masked-lm": T.AutoModelForMaskedLM,
        "seq-cls": T.AutoModelForSequenceClassification,
        **{h: getattr(T, name) for h, name in MODALITY_HEADS.items()},
    }[head]
    for key, small in TINY_TOKEN_IDS.items():
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= 96:
            setattr(config, key, small)
    if head == "seq2seq-lm" and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id  # labels are shifted right from it
    if head == "seq-cls":
        config.num_labels = 3
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
    torch.manual_seed(0)
    return auto.from_config(config)


class BiasBlock(Block):
    """A :class:`Block` that also adds a bias computed outside it (a shared position table)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) + bias


class SharedBiasLM(nn.Module):
    """Registration order that lies: modules registered after the blocks run before them.

    ``embed_norm`` (like BART's ``layernorm_embedding``) and ``bias`` (a position-bias table
    computed once and passed into every block) are registered after the blocks but used before
    them; a split by registration order puts them in the head, where truncation cuts them off.
    """

    def __init__(self, vocab: int = 32, d: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(BiasBlock(d) for _ in range(layers))
        self.embed_norm = nn.LayerNorm(d)
        self.bias = nn.Embedding(64, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.embed(ids))
        bias = self.bias(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, bias)
        return self.lm_head(x)


def tiny_modality_model(kind: str):
    """A tiny ``transformers`` model that takes pixels, a spectrogram or a waveform.

    Args:
        kind: ``"vit"`` (image classification), ``"whisper"`` (speech to text, an encoder-decoder
            on a spectrogram), ``"wav2vec2"`` (CTC on a waveform) or ``"llava"`` (a CLIP vision
            tower and a Llama decoder, image tokens in the text).
    """
    import transformers as T

    attention = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    torch.manual_seed(0)
    if kind == "vit":
        return T.ViTForImageClassification(
            T.ViTConfig(**attention, num_hidden_layers=2, image_size=32, patch_size=8)
        )
    if kind == "whisper":
        sizes = dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64)
        heads = dict(encoder_attention_heads=2, decoder_attention_heads=2)
        return T.WhisperForConditionalGeneration(
            T.WhisperConfig(
                **sizes,
                **heads,
                vocab_size=96,
                encoder_layers=2,
                decoder_layers=2,
                num_mel_bins=16,
                max_source_positions=16,
                max_target_positions=32,
                pad_token_id=3,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
                begin_suppress_tokens=None,
                suppress_tokens=None,
            )
        )
    if kind == "wav2vec2":
        # 3 encoder layers (the 2 convolutions of the feature encoder are no block stack).
        return T.Wav2Vec2ForCTC(
            T.Wav2Vec2Config(
                **attention,
                num_hidden_layers=3,
                vocab_size=24,
                conv_dim=(16, 16),
                conv_kernel=(3, 3),
                conv_stride=(2, 2),
                num_feat_extract_layers=2,
                num_conv_pos_embeddings=4,
                num_conv_pos_embedding_groups=2,
            )
        )
    if kind == "llava":
        vision = T.CLIPVisionConfig(**attention, num_hidden_layers=2, image_size=32, patch_size=8)
        text = T.LlamaConfig(**attention, num_hidden_layers=2, num_key_value_heads=1, vocab_size=96)
        # The last vision layer's output feeds the projector, so every weight is trained.
        config = T.LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=95, vision_feature_layer=-1
        )
        return T.LlavaForConditionalGeneration(config)
    raise KeyError(kind)


#: Head (``hiftune.memory.configs.HEADS``) -> the kind of :func:`tiny_modality_model` built for it.
HEAD_KINDS = {
    "speech-seq2seq": "whisper",
    "image-cls": "vit",
    "ctc": "wav2vec2",
    "image-text-to-text": "llava",
}


def tiny_head_config(head: str):
    """A tiny config for a head beyond the causal LM (sizes of :func:`tiny_modality_model`)."""
    import transformers as T

    if head == "seq2seq-lm":
        return T.T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
        )
    config = tiny_modality_model(HEAD_KINDS[head]).config
    if head == "ctc":
        # No SpecAugment: its mask embedding only runs in training mode, which the memory tools'
        # checks (in eval mode, see docs/inspect.md) cannot see.
        config.mask_time_prob = 0.0
    return config
