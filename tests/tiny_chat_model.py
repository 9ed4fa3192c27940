"""A tiny random-weight Llama chat model saved as a Hugging Face folder, with a word-level tokenizer
built on the spot by the `tokenizers` library (no hub access), for tests that start `loramux serve`
on a real model folder. It has no end-of-sequence token, so every answer runs to max_tokens."""

from __future__ import annotations

import os

WORDS = ("the a an and or but of to in on at for with from by about as is are was were be been it this that "
         "these those i you he she we they me him her us them my your his its our their what which who when where "
         "why how yes no not all any some many much more most few one two three four five six seven eight nine "
         "ten cat dog bird fish tree sea sky sun moon star rain snow wind fire water stone city road house door "
         "room book word song story name day night year time light dark red blue green white black big small "
         "old new good bad fast slow hot cold happy sad tell give make take go come see know think say write read "
         "sing run walk help please thanks hello world question answer haiku capital france paris tips focus "
         "plant food turtle physicist discovery lora adapter sentence times user assistant system").split()
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
PUNCTUATION = list(".,?!:;'\"-()0123456789")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} : {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}")
CONTEXT = 128  # max_position_embeddings: small, so a too-long prompt is easy to write


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + PUNCTUATION + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, punctuation attached
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=CHAT_TEMPLATE)


def save_tiny_chat_model(folder: str, seed: int = 0) -> str:
    """Saves the model and tokenizer into `folder`; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         bos_token_id=None, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_adapter(model_folder: str, out_dir: str, seed: int, r: int = 4,
                 targets=("q_proj", "v_proj", "gate_proj", "down_proj")) -> str:
    """A PEFT LoRA adapter with random non-zero A and B for the saved model (changes its answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  init_lora_weights=False))
    with torch.no_grad():
        for module in peft_model.modules():
            if "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.normal_(0.0, 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir
